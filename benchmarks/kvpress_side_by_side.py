"""kvpress's SnapKV press next to our SnapKV and SpecKV caches, on the same prompts, in the same process.

kvpress pins transformers < 5.3, so this runs in its own environment:

    python3.11 -m venv kvpress-env && kvpress-env/bin/pip install torch==2.13.0 kvpress==0.5.5
    kvpress-env/bin/pip install --no-deps -e .
    kvpress-env/bin/python benchmarks/kvpress_side_by_side.py --samples 2 --out benchmarks/results/kvpress-2k

kvpress is used the way its README documents for `generate`: `with press(model): model.generate(...)`, which
compresses the whole prompt during the prefill (question included, like our caches). Its SnapKV keeps
`int(n * (1 - compression_ratio))` pairs per head; the ratio is chosen so that it keeps exactly `--budget`, the same
count as ours. Knobs: kvpress's defaults (window 64, average-pool kernel 5) unless `--kvpress-window` /
`--kvpress-kernel` say otherwise; ours: the paper's (window 32, kernel 7). Decoding is the same greedy call for all.
Methods alternate per prompt so that the machine's load hits them alike. Rows are appended to
`<out>/results.jsonl`; a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey", "vt", "qa"])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=["kvpress_snapkv", "snapkv"],
                        choices=["kvpress_snapkv", "snapkv", "speckv", "full"])
    parser.add_argument("--kvpress-window", type=int, default=64)
    parser.add_argument("--kvpress-kernel", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/kvpress-2k")
    args = parser.parse_args()

    import kvpress
    import transformers
    from kvpress import SnapKVPress
    from transformers import DynamicCache

    from hf_specapprox_eval import make_samples, run_method, score
    from hf_specapprox_eval.methods import _greedy
    from hf_specapprox_eval.models import load_pair

    torch.set_num_threads(args.threads)
    target, draft, tokenizer = load_pair()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = set()
    if path.exists():
        done = {(r["task"], r["index"], r["method"]) for r in map(json.loads, path.read_text().splitlines())}
    versions = dict(kvpress=kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
                    transformers=transformers.__version__, torch=torch.__version__)
    print(json.dumps(versions))
    with open(path, "a") as handle:
        for sample in make_samples(args.tasks, tokenizer, args.length, args.samples):
            encoded = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False)
            n = encoded["input_ids"].shape[1]
            for method in args.methods:
                if (sample.task, sample.index, method) in done:
                    continue
                start = time.perf_counter()
                with torch.no_grad():
                    if method == "kvpress_snapkv":
                        # int(n * (1 - ratio)) == budget exactly (the half token guards the float rounding).
                        press = SnapKVPress(compression_ratio=1 - (args.budget + 0.5) / n,
                                            window_size=args.kvpress_window, kernel_size=args.kvpress_kernel)
                        with press(target):
                            sequences = _greedy(target, encoded["input_ids"], encoded["attention_mask"],
                                                sample.max_new_tokens, past_key_values=DynamicCache())
                        tokens = sequences[:, n:]
                    else:
                        tokens, _ = run_method(method, target, draft, encoded["input_ids"],
                                               encoded["attention_mask"], budget=args.budget,
                                               max_new_tokens=sample.max_new_tokens)
                seconds = time.perf_counter() - start
                prediction = tokenizer.decode(tokens[0], skip_special_tokens=True)
                row = dict(task=sample.task, index=sample.index, method=method, budget=args.budget, prompt_tokens=n,
                           prediction=prediction, answers=sample.answers,
                           score=score(prediction, sample.answers, sample.metric), seconds=seconds, **versions)
                handle.write(json.dumps(row) + "\n")
                handle.flush()
                print(f"{sample.task} #{sample.index} {method}: {row['score']:.0f} in {seconds:.1f} s")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    print("| method | samples | score | seconds (mean) | vs our SnapKV |\n|---|---|---|---|---|")
    by_method = {m: [r for r in rows if r["method"] == m] for m in dict.fromkeys(r["method"] for r in rows)}
    # Time ratios over the prompts every method finished.
    common = set.intersection(*({(r["task"], r["index"]) for r in group} for group in by_method.values()))
    mean = {m: sum(r["seconds"] for r in g if (r["task"], r["index"]) in common) / max(len(common), 1)
            for m, g in by_method.items()}
    for method, group in by_method.items():
        ratio = mean[method] / mean["snapkv"] if mean.get("snapkv") else float("nan")
        print(f"| {method} | {len(group)} | {sum(r['score'] for r in group) / len(group):.1f} | {mean[method]:.1f} | "
              f"{ratio:.2f} |")


if __name__ == "__main__":
    main()
