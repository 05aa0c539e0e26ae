"""Window-score kernels: materialised torch vs chunked torch vs Triton, time and peak memory.

"materialised" is the reference with one chunk spanning all keys, i.e. the full `(B, H, W, N)` fp32 probability
tensor, as the paper's code computes it; "chunked" is the reference with 4,096-key chunks (the CPU default);
"triton" is the fused two-pass kernel (CUDA only). Inputs are bf16 on CUDA (as a bf16 model hands them over) and
fp32 on CPU. Ratios are against "materialised" in the same run; Triton's result is also checked against "chunked".

    python benchmarks/scoring.py --preset paper          # on a GPU: H=32, H_kv=8, d=128, W in {33,161,545}, N to 64K
    python benchmarks/scoring.py --preset tiny           # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hf_specapprox.kernels import window_scores

PRESETS = {
    "tiny": dict(heads=4, kv_heads=2, head_dim=32, windows=[17], keys=[1024, 4096]),
    "paper": dict(heads=32, kv_heads=8, head_dim=128, windows=[33, 161, 545], keys=[4096, 16384, 32768, 65536]),
}


def timed(fn, device, repeats):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=repeats * 10, return_mode="median")
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_bytes(fn, device):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    methods = {
        "materialised": lambda q, k, kw: window_scores(q, k, implementation="torch", chunk_size=k.shape[2], **kw),
        "chunked": lambda q, k, kw: window_scores(q, k, implementation="torch", chunk_size=4096, **kw),
    }
    if device == "cuda":
        methods["triton"] = lambda q, k, kw: window_scores(q, k, implementation="triton", **kw)

    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    for window in preset["windows"]:
        for num_keys in preset["keys"]:
            q = torch.randn(1, preset["heads"], window, preset["head_dim"], device=device, dtype=dtype, generator=generator)
            k = torch.randn(1, preset["kv_heads"], num_keys, preset["head_dim"], device=device, dtype=dtype,
                            generator=generator)
            kw = dict(scaling=preset["head_dim"] ** -0.5, query_offset=num_keys - window, reduction="max")
            results = {}
            for name, method in methods.items():
                try:
                    out = method(q, k, kw)
                    ms = timed(lambda: method(q, k, kw), device, args.repeats)
                    results[name] = dict(ms=ms, peak=peak_bytes(lambda: method(q, k, kw), device), out=out)
                except torch.OutOfMemoryError:
                    results[name] = dict(ms=None, peak=None, out=None)
                    torch.cuda.empty_cache()
            error = None
            if "triton" in results and results["triton"]["out"] is not None:
                error = (results["triton"]["out"] - results["chunked"]["out"]).abs().max().item()
            base = results["materialised"]
            for name, result in results.items():
                rows.append(dict(
                    window=window, keys=num_keys, method=name, ms=result["ms"], peak_mib=None if result["peak"] is None
                    else result["peak"] / 2**20,
                    speedup=None if result["ms"] is None or base["ms"] is None else base["ms"] / result["ms"],
                    memory_ratio=None if result["peak"] is None or not base["peak"] else result["peak"] / base["peak"],
                    max_abs_err_vs_chunked=error if name == "triton" else None,
                ))

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, dtype {dtype}, H={preset['heads']} H_kv={preset['kv_heads']} "
          f"d={preset['head_dim']}")
    print("| W | N | method | ms (median) | speed-up vs materialised | peak MiB | memory vs materialised | max abs err |")
    print("|---|---|---|---|---|---|---|---|")

    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    for row in rows:
        print(f"| {row['window']} | {row['keys']} | {row['method']} | {fmt(row['ms'], '.3f')} | "
              f"{fmt(row['speedup'], '.2f')} | {fmt(row['peak_mib'], '.1f')} | {fmt(row['memory_ratio'], '.4f')} | "
              f"{fmt(row['max_abs_err_vs_chunked'], '.1e')} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(dict(device=name, torch=torch.__version__, dtype=str(dtype), preset=preset, rows=rows), handle,
                      indent=1)


if __name__ == "__main__":
    main()
