"""Prints the study's table (per method and budget: samples, score, per-task scores, how many answers are the full
target's answer word for word, mean seconds and the ratio to the full target over the same samples) from a
results.jsonl written by `hf-specapprox eval`.

    python benchmarks/study_table.py benchmarks/results/study-2k/results.jsonl
    python benchmarks/study_table.py benchmarks/results/study-2k/results.jsonl --from-index 4   # samples 4, 5, ...
    python benchmarks/study_table.py benchmarks/results/sparse-8k-essay/results.jsonl --reference speckv+dense

`--reference` names the method the answer and time columns compare with (the full target by default).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from hf_specapprox_eval import HARNESS_METHODS as METHODS, read_results

NAMES = {"full": "full target", "draft": "draft alone", "speckv": "SpecKV", "snapkv": "SnapKV",
         "streamingllm": "StreamingLLM", "knorm": "Knorm", "specpc": "SpecPC", "specprefill": "SpecPrefill",
         "speckv_pc": "SpecKV-PC"}
VARIANT_NAMES = {"pyramid": " + pyramid", "dense": " (dense prefill)", "nodrop": " (sparse prefill, no eviction)"}


def display_name(method: str) -> str:
    base, _, variant = method.partition("+")
    return NAMES.get(base, base) + (VARIANT_NAMES.get(variant, f" + {variant}") if variant else "")


def order(method: str) -> tuple:
    base, _, variant = method.partition("+")
    return (list(NAMES).index(base) if base in NAMES else len(NAMES), variant)


def main(path: str, from_index: int = 0, pc_budget: int = 1024, to_index: int | None = None,
         reference: str = "full") -> None:
    rows = [row for row in read_results(path)
            if row["index"] >= from_index and (to_index is None or row["index"] < to_index)]
    tasks = sorted({row["task"] for row in rows})
    ref_seconds = {(row["task"], row["index"]): row["seconds"] for row in rows if row["method"] == reference}
    ref_answer = {(row["task"], row["index"]): row["prediction"].strip() for row in rows if row["method"] == reference}
    ref = "full" if reference == "full" else display_name(reference)
    groups = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["budget"])].append(row)
    print("| method | budget | samples | score | " + " | ".join(tasks) + f" | = {ref}'s answer | seconds (mean) "
          f"| vs {ref} (same samples) |")
    print("|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|")
    for (method, budget), items in sorted(groups.items(), key=lambda kv: (order(kv[0][0]), kv[0][1] or 0)):
        per_task = {task: [r["score"] for r in items if r["task"] == task] for task in tasks}
        paired = [(r["seconds"], ref_seconds[(r["task"], r["index"])]) for r in items
                  if (r["task"], r["index"]) in ref_seconds]
        ratio = sum(s for s, _ in paired) / sum(f for _, f in paired) if paired else float("nan")
        unit = "" if budget is None else (" KV" if METHODS.get(method) == "kv" else " tokens")
        if method.partition("+")[0] == "speckv_pc":  # the first stage's prompt budget is the runner's --pc-budget
            unit = f" KV (after SpecPC to {pc_budget:,})"
        same = sum(r["prediction"].strip() == ref_answer[(r["task"], r["index"])] for r in items
                   if (r["task"], r["index"]) in ref_answer)
        cells = " | ".join(f"{sum(v) / len(v):.0f} ({len(v)})" if v else "—" for v in per_task.values())
        print(f"| {display_name(method)} | {budget or '—'}{unit} | {len(items)} | {sum(r['score'] for r in items) / len(items):.1f}"
              f" | {cells} | {same}/{len(paired)} | {sum(r['seconds'] for r in items) / len(items):.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="results.jsonl of `hf-specapprox eval`")
    parser.add_argument("--from-index", type=int, default=0, help="only samples with this index or higher")
    parser.add_argument("--to-index", type=int, default=None, help="only samples with an index below this")
    parser.add_argument("--pc-budget", type=int, default=1024, help="the --pc-budget the SpecKV-PC rows ran with")
    parser.add_argument("--reference", default="full", help="the method the answer and time columns compare with")
    args = parser.parse_args()
    main(args.results, args.from_index, args.pc_budget, args.to_index, args.reference)
