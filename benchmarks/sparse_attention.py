"""One layer's prefill attention: dense causal SDPA vs the vertical-slash sparse attention of the SpecKV prefill.

16 query / 16 KV heads x 64, batch 1, fp32 on CPU; 2,048 random vertical columns per KV head, window 2,048, block 64
(the paper's settings). Steady state: the first call (compilation included) is reported apart, then the median of
`--repeats` calls.

    python benchmarks/sparse_attention.py --lengths 8192 16384 32768 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from hf_specapprox.kernels.sparse_attention import vertical_slash_attention


def timed(fn, repeats):
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vertical", type=int, default=2048)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write {'rows': [...]} here")
    args = parser.parse_args()

    torch.manual_seed(0)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| n | dense s | sparse s | sparse / dense | sparse first call s |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.lengths:
        q = torch.randn(1, args.heads, n, args.head_dim)
        k = torch.randn(1, args.kv_heads, n, args.head_dim)
        v = torch.randn(1, args.kv_heads, n, args.head_dim)
        columns = torch.rand(1, args.kv_heads, n).argsort(dim=-1)[..., : args.vertical]
        scaling = args.head_dim**-0.5

        def dense():
            with torch.no_grad():
                gqa = args.heads != args.kv_heads
                F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)

        def sparse():
            vertical_slash_attention(q, k, v, columns, scaling=scaling, window_size=args.window, block_size=args.block)

        _, dense_s = timed(dense, args.repeats)
        first_s, sparse_s = timed(sparse, args.repeats)
        row = dict(n=n, dense_s=dense_s, sparse_s=sparse_s, ratio=sparse_s / dense_s, sparse_first_s=first_s)
        rows.append(row)
        print(f"| {n} | {dense_s:.3f} | {sparse_s:.3f} | {row['ratio']:.2f} | {first_s:.1f} |", flush=True)
    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), **vars(args)}
        with open(args.json, "w") as f:
            json.dump({"rows": rows, **meta}, f, indent=1)


if __name__ == "__main__":
    main()
