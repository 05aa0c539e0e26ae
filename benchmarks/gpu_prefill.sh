#!/usr/bin/env bash
# GPU prefill-memory comparison at 32K and 128K tokens (random Llama with 8B-like attention shapes, 8 layers, bf16).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_prefill}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for tokens in 32768 131072; do
  python3 benchmarks/prefill_memory.py --device cuda --dtype bfloat16 --prompt-tokens $tokens --layers 8 \
    --heads 32 --kv-heads 8 --head-dim 128 --budget 1024 --lookahead 64 --draft-layers 2 2>&1 | tee "$OUT/prefill_$tokens.txt"
done
