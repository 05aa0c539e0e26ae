#!/usr/bin/env bash
# GPU session for the ecosystem pieces: a target split between the GPU and the CPU (accelerate device_map), PEFT,
# the Hub custom_generate folder and `hf-specapprox bench --device cuda`, then the whole suite.
# Usage on a GPU machine, from the repository root:  OUT=/some/dir bash benchmarks/gpu_integrations.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_integrations}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# custom_generate checks its requirements.txt against installed distributions: install the checkout (no deps).
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -rfs tests/test_integrations.py tests/test_custom_generate.py 2>&1 | grep -E '^(FAILED|SKIPPED|E  )|passed|failed' | tail -n 30 | tee "$OUT/pytest_integrations.txt"
python3 -m hf_specapprox_eval.cli bench --tiny --device cuda --length 512 --budget 64 --pc-budget 128 \
  --methods full speckv snapkv specpc 2>&1 | tail -n 8 | tee "$OUT/bench_tiny_cuda.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider -x tests --deselect tests/test_eval.py::test_cli_shards_under_torchrun 2>&1 | grep -E '^(FAILED|E  )|passed|failed' | tail -n 20 | tee "$OUT/pytest_all.txt"
