"""A tensor-parallel target on CPU: 2 ranks (torchrun, gloo, one thread each) against one process (two threads).

For a random-weight Llama (`--preset tiny`: hidden 64, 2 layers; `--preset mid`: hidden 768, 6 layers, 12 query /
4 KV heads, MLP 2,048, vocab 8,192, ~70M parameters) and a 1-layer draft, stock `generate` (a `DynamicCache`) and
SpecKV (budget 128) each run one warm-up and `--runs` timed generations; reported: the median wall time, and each
process's peak resident memory during the timed runs (the high-water mark is reset after loading and warm-up with
Linux `clear_refs`), per rank for the sharded run. The tokens of both runs are compared.

    python benchmarks/tensor_parallel.py --preset mid [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=97, prompt=512, new=16),
    "mid": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                num_key_value_heads=4, vocab_size=8192, prompt=1024, new=32),
}


def _status(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker(folder: str, runs: int, prompt: int, new: int) -> None:
    """One process: load, warm up, time stock and SpecKV, write `rank<R>.json` into `folder`."""
    from transformers import AutoModelForCausalLM

    import hf_specapprox as hs
    from hf_specapprox import compat

    sharded = "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    target = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "target"),
                                                  **(compat.tensor_parallel_kwargs() if sharded else {}))
    draft = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "draft")).eval()
    hs.bind(target)
    vocab = target.config.vocab_size
    ids = torch.randint(3, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def run(method):
        cache = None
        if method == "speckv":
            cache = hs.SpecKVCache(draft=draft, max_capacity_prompt=128, window_size=32, lookahead_tokens=new)
        kwargs = {} if cache is None else {compat.cache_kwarg_name(target): cache}
        start = time.perf_counter()
        out = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0, **kwargs)
        return time.perf_counter() - start, out[0, prompt:].tolist()

    for method in ("stock", "speckv"):
        run(method)  # warm-up
    results = {}
    for method in ("stock", "speckv"):
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
        times, tokens = [], None
        for _ in range(runs):
            seconds, tokens = run(method)
            times.append(seconds)
        results[method] = dict(seconds=statistics.median(times), peak_rss_bytes=_status("VmHWM"),
                               added_rss_bytes=_status("VmHWM") - before, tokens=tokens)
    results["threads"] = torch.get_num_threads()
    Path(folder, f"{'sharded' if sharded else 'single'}-rank{rank}.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--worker", nargs=4, metavar=("FOLDER", "RUNS", "PROMPT", "NEW"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        folder, runs, prompt, new = args.worker
        worker(folder, int(runs), int(prompt), int(new))
        return []
    from transformers import LlamaConfig, LlamaForCausalLM

    preset = dict(PRESETS[args.preset])
    prompt, new = preset.pop("prompt"), preset.pop("new")
    common = dict(max_position_embeddings=8192, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                  tie_word_embeddings=False)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**preset, **common)).eval().save_pretrained(os.path.join(folder, "target"))
        LlamaForCausalLM(LlamaConfig(**{**preset, "num_hidden_layers": 1}, **common)).eval().save_pretrained(
            os.path.join(folder, "draft"))
        worker_args = [__file__, "--worker", folder, str(args.runs), str(prompt), str(new)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                            os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, *worker_args], check=True, env={**env, "OMP_NUM_THREADS": "2"})
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(_free_port()), *worker_args], check=True,
                       env={**env, "OMP_NUM_THREADS": "1"})
        single = json.loads(Path(folder, "single-rank0.json").read_text())
        ranks = [json.loads(Path(folder, f"sharded-rank{rank}.json").read_text()) for rank in range(2)]
    print(f"# {args.preset}: prompt {prompt}, {new} new tokens, medians of {args.runs}; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| method | one process (s) | 2 ranks (s) | ratio | one process peak RSS (MiB) | per-rank peak RSS (MiB) | "
          "rank / one process | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for method in ("stock", "speckv"):
        one, two = single[method], [rank[method] for rank in ranks]
        seconds = max(rank["seconds"] for rank in two)
        peak = max(rank["peak_rss_bytes"] for rank in two)
        same = all(rank["tokens"] == one["tokens"] for rank in two)
        row = dict(preset=args.preset, method=method, prompt_tokens=prompt, new_tokens=new,
                   single_seconds=one["seconds"], tp_seconds=seconds, time_ratio=seconds / one["seconds"],
                   single_peak_rss_mib=one["peak_rss_bytes"] / 2**20,
                   tp_peak_rss_mib=[rank["peak_rss_bytes"] / 2**20 for rank in two],
                   memory_ratio=peak / one["peak_rss_bytes"], same_tokens=same)
        rows.append(row)
        print(f"| {method} | {one['seconds']:.3f} | {seconds:.3f} | {row['time_ratio']:.2f}x | "
              f"{row['single_peak_rss_mib']:.0f} | {' / '.join(f'{m:.0f}' for m in row['tp_peak_rss_mib'])} | "
              f"{row['memory_ratio']:.2f}x | {same} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
