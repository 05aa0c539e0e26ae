"""Same answers before and after a change: run the harness's methods on the embedded pair over fixed prompts with two
checkouts of the library, and compare the answer tokens.

The prompts are built once (by the checkout this script runs from) and saved, so that a change in prompt sizing cannot
hide behind the comparison; each checkout then answers them in its own process (its `hf_specapprox` and
`hf_specapprox_eval` first on `PYTHONPATH`), greedy, with its own harness's configs for each method::

    python benchmarks/same_answers.py prompts --tasks niah_single niah_multikey --length 2048 --samples 1 \\
        --out prompts.pt
    PYTHONPATH=/path/to/old-checkout python benchmarks/same_answers.py run --prompts prompts.pt \\
        --methods full speckv specpc --out old.json
    python benchmarks/same_answers.py run --prompts prompts.pt --methods full speckv specpc --out new.json
    python benchmarks/same_answers.py compare old.json new.json

`run` resumes: rows already in `--out` are kept. Budgets: 128 KV pairs for KV methods, 512 prompt tokens for prompt
methods (the study's), as `--budget` / `--prompt-budget`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def build_prompts(args):
    import torch
    from hf_specapprox_eval.models import local_path
    from hf_specapprox_eval.tasks import make_samples
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_path("target"), padding_side="left")
    rows = []
    for sample in make_samples(args.tasks, tokenizer, args.length, args.samples, "noise", 0):
        ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        rows.append(dict(task=sample.task, index=sample.index, input_ids=ids, answers=list(sample.answers),
                         max_new_tokens=sample.max_new_tokens))
    torch.save(rows, args.out)
    print(f"{len(rows)} prompts ({', '.join(str(r['input_ids'].shape[1]) for r in rows)} tokens) -> {args.out}")


def checkout(package) -> str:
    """The commit of the checkout `package` was imported from (a name, not a machine path)."""
    import subprocess

    folder = Path(package.__file__).resolve().parent.parent
    done = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--", package.__name__],
                           capture_output=True, text=True).stdout.strip()
    commit = done.stdout.strip() if done.returncode == 0 else "an unknown commit"
    return f"{package.__name__} at {commit}" + (" (modified)" if dirty else "")


def run(args):
    import torch

    import hf_specapprox
    from hf_specapprox_eval.methods import run_method
    from hf_specapprox_eval.models import load_embedded_pair

    try:  # each method's budget kind ("kv", "prompt" or None), as the checkout's own harness names it
        from hf_specapprox_eval.methods import HARNESS_METHODS as kinds
    except ImportError:  # checkouts before the names were settled
        from hf_specapprox_eval.methods import METHODS as kinds

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {"library": checkout(hf_specapprox), "rows": []}
    seen = {(r["task"], r["index"], r["method"]) for r in done["rows"]}
    prompts = torch.load(args.prompts)
    target, draft, tokenizer = load_embedded_pair()
    print(f"answering with {done['library']}", flush=True)
    for prompt in prompts:
        for method in args.methods:
            if (prompt["task"], prompt["index"], method) in seen:
                continue
            ids = prompt["input_ids"]
            budget = args.prompt_budget if kinds[method] == "prompt" else args.budget
            start = time.perf_counter()
            with torch.no_grad():
                tokens, _ = run_method(method, target, draft, ids, torch.ones_like(ids), budget=budget,
                                       max_new_tokens=prompt["max_new_tokens"])
            row = dict(task=prompt["task"], index=prompt["index"], method=method, budget=budget,
                       tokens=tokens[0].tolist(), answer=tokenizer.decode(tokens[0], skip_special_tokens=True),
                       seconds=time.perf_counter() - start)
            done["rows"].append(row)
            out.write_text(json.dumps(done, indent=1))  # after every answer: a crash loses at most one
            print(f"{row['task']} {row['index']} {method}: {row['answer']!r} ({row['seconds']:.1f} s)", flush=True)


def compare(args):
    before, after = (json.loads(Path(path).read_text()) for path in (args.before, args.after))
    rows = {(r["task"], r["index"], r["method"]): r for r in after["rows"]}
    print(f"before: {before['library']}\nafter: {after['library']}\n")
    print("| task | sample | method | before | after | same tokens |\n|---|---|---|---|---|---|")
    same = total = 0
    for old in before["rows"]:
        new = rows.get((old["task"], old["index"], old["method"]))
        if new is None:
            continue
        total += 1
        same += old["tokens"] == new["tokens"]
        print(f"| {old['task']} | {old['index']} | {old['method']} | {old['answer']!r} | {new['answer']!r} "
              f"| {'yes' if old['tokens'] == new['tokens'] else 'no'} |")
    print(f"\n{same} of {total} answers token for token the same")
    return 0 if same == total else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prompts = commands.add_parser("prompts")
    prompts.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey"])
    prompts.add_argument("--length", type=int, default=2048)
    prompts.add_argument("--samples", type=int, default=1)
    prompts.add_argument("--out", required=True)
    runs = commands.add_parser("run")
    runs.add_argument("--prompts", required=True)
    runs.add_argument("--methods", nargs="+", default=["full", "speckv", "specpc"])
    runs.add_argument("--budget", type=int, default=128)
    runs.add_argument("--prompt-budget", type=int, default=512)
    runs.add_argument("--threads", type=int, default=1)
    runs.add_argument("--out", required=True)
    compares = commands.add_parser("compare")
    compares.add_argument("before")
    compares.add_argument("after")
    args = parser.parse_args(argv)
    return {"prompts": build_prompts, "run": run, "compare": compare}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
