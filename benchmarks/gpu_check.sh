#!/usr/bin/env bash
# One-shot GPU session: environment, the test suite (Triton kernels on CUDA tensors), then the scoring benchmark.
# Usage on a GPU machine, from the repository root:  OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_triton_scoring.py tests/test_scoring.py 2>&1 | tail -n 15 | tee "$OUT/pytest_triton.txt"
python3 benchmarks/scoring.py --preset paper --out "$OUT/scoring.json" 2>&1 | tee "$OUT/scoring.txt"
python3 -m pytest -q -p no:cacheprovider -x tests 2>&1 | tail -n 5 | tee "$OUT/pytest_all.txt"
