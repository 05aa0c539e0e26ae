#!/usr/bin/env bash
# The long-context study's gpu preset on one GPU (sized for one H200 in under 8 minutes): a Llama-3-8B-shaped target
# and a Llama-3.2-1B-shaped draft with random bf16 weights, prompts 32K and 128K, 256 new tokens, one warm-up and two
# timed runs per method (stock; SpecKV, budget 1,024, sparse prefill, with dynamic and with static compiled decoding;
# SnapKV), then a capped doubling batch search at 128K for stock and SpecKV (stopped before the deadline).
#   bash benchmarks/gpu_long_context.sh            # writes benchmarks/results/long_context_gpu_<date>.{json,txt}
# Extra arguments go to benchmarks/long_context.py (e.g. --methods stock,speckv_dense,speckv_sparse,snapkv).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%d-%H%M)
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
{
  date -u
  nvidia-smi || echo "nvidia-smi not found"
  "$PYTHON" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "| torch", torch.__version__,
    "| cuda", torch.version.cuda, "| transformers", transformers.__version__,
    "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
  "$PYTHON" -c 'import triton; print("triton", triton.__version__)' 2>/dev/null || echo "triton: not installed"
  git log -1 --oneline 2>/dev/null || true
  time "$PYTHON" benchmarks/long_context.py --preset gpu --json "$OUT/long_context_gpu_$STAMP.json" "$@"
} 2>&1 | tee "$OUT/long_context_gpu_$STAMP.txt"
