"""The evaluation loop: tasks × context lengths × methods × budgets, one JSON line per answer, resumable."""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from pathlib import Path

from transformers.utils.logging import tqdm

from .methods import HARNESS_METHODS, run_method
from .metrics import score
from .tasks import make_samples


def _key(row) -> tuple:
    return (row["task"], row["index"], row["context_length"], row["method"], row["budget"])


def read_results(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: recomputed on resume
                continue
    return rows


def shard_path(out_path, shard: tuple[int, int] | None) -> Path:
    """Where shard `(index, count)` of a run writes: `results.jsonl` → `results.shard-1-of-4.jsonl`."""
    out_path = Path(out_path)
    if shard is None:
        return out_path
    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise ValueError(f"`shard` must be (index, count) with 0 <= index < count, got {shard!r}.")
    return out_path.with_name(f"{out_path.stem}.shard-{index}-of-{count}{out_path.suffix}")


def read_merged_results(out_path) -> list[dict]:
    """The rows of `out_path` and of every shard file beside it, each (sample, method, budget) once."""
    out_path = Path(out_path)
    paths = [out_path, *sorted(out_path.parent.glob(f"{out_path.stem}.shard-*{out_path.suffix}"))]
    merged = {}
    for path in paths:
        for row in read_results(path):
            merged.setdefault(_key(row), row)
    return list(merged.values())


def run_eval(target, draft, tokenizer, *, tasks, methods, budgets, context_lengths, num_samples, out_path,
             prompt_budgets=None, pc_budget: int = 2048, haystack: str = "noise", seed: int = 0,
             shard: tuple[int, int] | None = None) -> list[dict]:
    """Runs every (sample, method, budget) not already in `out_path` and appends its row there.

    `budgets` are KV budgets (SpecKV, SnapKV, StreamingLLM, SpecKV-PC's second stage), `prompt_budgets` prompt
    budgets (SpecPC, SpecPrefill; default: `budgets`); `full` and `draft` run once per sample. A crash loses at most
    the answer being computed: rerun with the same arguments to continue.

    With `shard=(index, count)` this process takes every `count`-th sample (a sample's methods stay together, so
    their time ratios compare like with like) and writes to its own file beside `out_path` (see [`shard_path`]); run
    one process per index, e.g. under `torchrun` or `accelerate launch`. Rows already in `out_path` or any shard file
    are skipped, whichever layout wrote them.

    Returns:
        All rows of `out_path` and its shard files for the requested grid.
    """
    unknown = sorted(set(methods) - set(HARNESS_METHODS))
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {sorted(HARNESS_METHODS)}.")
    out_path = Path(out_path)
    write_path = shard_path(out_path, shard)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(row) for row in read_merged_results(out_path)}
    grid = {"kv": list(budgets), "prompt": list(prompt_budgets or budgets), None: [None]}
    jobs = []
    for length in context_lengths:
        samples = make_samples(tasks, tokenizer, length, num_samples, haystack, seed)
        for number, sample in enumerate(samples):
            if shard is not None and number % shard[1] != shard[0]:
                continue
            for method in methods:
                for budget in grid[HARNESS_METHODS[method]]:
                    key = (sample.task, sample.index, length, method, budget)
                    if key not in done:
                        jobs.append((length, sample, method, budget))
    with open(write_path, "a") if jobs else contextlib.nullcontext() as handle:
        for length, sample, method, budget in tqdm(jobs, desc="evaluating"):
            encoded = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False)
            start = time.perf_counter()
            new_tokens, stats = run_method(method, target, draft, encoded["input_ids"], encoded["attention_mask"],
                                           budget=budget, max_new_tokens=sample.max_new_tokens, pc_budget=pc_budget)
            seconds = time.perf_counter() - start
            prediction = tokenizer.decode(new_tokens[0], skip_special_tokens=True)
            row = dict(task=sample.task, index=sample.index, context_length=length,
                       prompt_tokens=encoded["input_ids"].shape[1], method=method, budget=budget,
                       prediction=prediction, answers=sample.answers, score=score(prediction, sample.answers,
                                                                                 sample.metric),
                       seconds=seconds, **stats)
            handle.write(json.dumps(row) + "\n")
            handle.flush()
    wanted = {(t, i, length) for length in context_lengths for t in tasks for i in range(num_samples)}
    return [row for row in read_merged_results(out_path)
            if (row["task"], row["index"], row["context_length"]) in wanted and row["method"] in methods]


def summarize(rows: list[dict]) -> list[dict]:
    """Mean score and seconds per (context length, method, budget), with the per-task means."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["context_length"], row["method"], row["budget"])].append(row)
    table = []
    for (length, method, budget), items in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)):
        per_task = defaultdict(list)
        for item in items:
            per_task[item["task"]].append(item["score"])
        table.append(dict(
            context_length=length, method=method, budget=budget, samples=len(items),
            score=sum(i["score"] for i in items) / len(items),
            seconds=sum(i["seconds"] for i in items) / len(items),
            per_task={task: sum(v) / len(v) for task, v in sorted(per_task.items())},
        ))
    return table


def markdown_table(summary: list[dict]) -> str:
    full = {row["context_length"]: row["seconds"] for row in summary if row["method"] == "full"}
    lines = ["| context | method | budget | samples | score | seconds | vs full |", "|---|---|---|---|---|---|---|"]
    for row in summary:
        ratio = row["seconds"] / full[row["context_length"]] if row["context_length"] in full else float("nan")
        lines.append(f"| {row['context_length']} | {row['method']} | {row['budget'] or '—'} | {row['samples']} | "
                     f"{row['score']:.1f} | {row['seconds']:.1f} | {ratio:.2f} |")
    return "\n".join(lines)


def plot(summary: list[dict], path) -> Path:
    """Accuracy vs budget, one line per budgeted method, `full` and `draft` as horizontal references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({row["context_length"] for row in summary})
    figure, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for axis, length in zip(axes[0], lengths):
        rows = [row for row in summary if row["context_length"] == length]
        for method in sorted({row["method"] for row in rows}):
            points = sorted((row["budget"], row["score"]) for row in rows if row["method"] == method and row["budget"])
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
            else:
                reference = next(row["score"] for row in rows if row["method"] == method)
                axis.axhline(reference, linestyle="--", color="gray" if method == "full" else "silver",
                             label=f"{method} ({reference:.0f})")
        axis.set(title=f"{length} tokens", xlabel="budget", ylabel="score", ylim=(-5, 105))
        axis.set_xscale("log", base=2)
        axis.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
