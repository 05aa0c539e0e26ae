"""`hf-specapprox bench`: seconds and peak memory per method, each method in a fresh process.

Peak resident memory is a per-process number, so every method runs in its own child process (`python -m
hf_specapprox_eval.bench`) that loads the models, resets the kernel's peak-RSS counter (Linux `clear_refs`), runs
the method on one prompt and reports:

* `seconds`: wall time of the method, models already loaded and warmed up on a short prompt;
* `peak_rss_bytes`: the peak resident memory of the process during the method (models included);
* `added_rss_bytes`: that peak minus the resident memory just before the method (what the method itself added:
  activations, KV cache, the draft's work);
* `peak_cuda_bytes` on CUDA: `torch.cuda.max_memory_allocated` during the method.

Ratios are taken against `full` measured in the same `bench` run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

_MEMORY_FIELDS = ("VmRSS", "VmHWM")


def _proc_status() -> dict[str, int]:
    """`VmRSS` and `VmHWM` of this process in bytes (empty where /proc is missing)."""
    values = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in _MEMORY_FIELDS:
                values[name] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter (`VmHWM`) to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(method: str, *, target: str | None, draft: str | None, tiny: bool, length: int, budget: int | None,
            pc_budget: int, max_new_tokens: int, task: str = "niah_single", threads: int | None = None,
            device: str = "cpu") -> dict:
    """Loads the models, runs `method` once on sample 0 of `task` and measures it (call in a fresh process)."""
    import torch

    from .methods import run_method
    from .metrics import score
    from .tasks import make_sample

    if threads:
        torch.set_num_threads(threads)
    if tiny:
        from hf_specapprox.testing import tiny_pair, tiny_tokenizer

        target_model, draft_model = tiny_pair()
        tokenizer = tiny_tokenizer()
    else:
        from .models import load_pair

        target_model, draft_model, tokenizer = load_pair(target, draft)
    target_model, draft_model = target_model.to(device), draft_model.to(device)
    device = target_model.device
    sample = make_sample(task, 0, tokenizer, length)
    encoded = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False).to(device)
    with torch.no_grad():  # first-call costs (kernel selection, lazy allocations) stay out of the measurement
        warm = tokenizer(make_sample(task, 1, tokenizer, 128).prompt, return_tensors="pt",
                         add_special_tokens=False).to(device)
        for model in ("full", "draft"):
            run_method(model, target_model, draft_model, warm["input_ids"], warm["attention_mask"], budget=None,
                       max_new_tokens=2)
    exact = _reset_peak_rss()
    before = _proc_status().get("VmRSS", 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.no_grad():
        tokens, stats = run_method(method, target_model, draft_model, encoded["input_ids"], encoded["attention_mask"],
                                   budget=budget, max_new_tokens=max_new_tokens, pc_budget=pc_budget)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    status = _proc_status()
    # Without clear_refs the high-water mark also covers model loading: reported, but flagged.
    peak = status.get("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    answer = tokenizer.decode(tokens[0], skip_special_tokens=True)
    row = dict(method=method, budget=budget, task=task, prompt_tokens=encoded["input_ids"].shape[1],
               seconds=seconds, peak_rss_bytes=peak, added_rss_bytes=peak - before, peak_rss_exact=exact,
               answer=answer.strip(), score=score(answer, sample.answers, sample.metric),
               **{key: value for key, value in stats.items() if isinstance(value, (int, float))})
    if device.type == "cuda":
        row["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return row


def run_bench(methods, *, target=None, draft=None, tiny=False, length=2048, budget=128, pc_budget=512,
              max_new_tokens=24, task="niah_single", threads=None, device="cpu", timeout=None) -> list[dict]:
    """Runs [`measure`] for each method in its own child process; `full` is always measured first, as the baseline.

    `budget` is the KV budget of SpecKV/SnapKV/StreamingLLM (and SpecKV-PC's second stage), `pc_budget` the prompt
    budget of SpecPC/SpecPrefill (and SpecKV-PC's first stage).

    Returns:
        One row per method, with `seconds_vs_full` and `added_rss_vs_full` ratios.
    """
    from .methods import HARNESS_METHODS

    unknown = sorted(set(methods) - set(HARNESS_METHODS))
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {sorted(HARNESS_METHODS)}.")
    order = ["full"] + [method for method in methods if method != "full"]
    rows = []
    for method in order:
        kind = HARNESS_METHODS[method]
        job = dict(method=method, target=target, draft=draft, tiny=tiny, length=length, task=task, threads=threads, device=device,
                   budget=None if kind is None else (budget if kind == "kv" else pc_budget),
                   pc_budget=pc_budget, max_new_tokens=max_new_tokens)
        done = subprocess.run([sys.executable, "-m", "hf_specapprox_eval.bench", json.dumps(job)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
        if done.returncode != 0:
            raise RuntimeError(f"bench worker for {method!r} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    baseline = rows[0]
    for row in rows:
        row["seconds_vs_full"] = row["seconds"] / baseline["seconds"]
        row["added_rss_vs_full"] = (row["added_rss_bytes"] / baseline["added_rss_bytes"]
                                    if baseline["added_rss_bytes"] > 0 else None)
        if "peak_cuda_bytes" in row:
            row["peak_cuda_vs_full"] = row["peak_cuda_bytes"] / baseline["peak_cuda_bytes"]
    return [row for row in rows if row["method"] in methods]


def bench_table(rows) -> str:
    """A markdown table of [`run_bench`] rows."""
    mib = 2**20
    cuda = any("peak_cuda_bytes" in row for row in rows)
    head = "| method | budget | seconds | vs full | peak RSS (MiB) | added RSS (MiB) | added vs full |"
    rule = "|---|---|---|---|---|---|---|"
    if cuda:
        head, rule = head + " peak CUDA (MiB) | CUDA vs full |", rule + "---|---|"
    lines = [head, rule]
    for row in rows:
        ratio = row["added_rss_vs_full"]
        line = (f"| {row['method']} | {row['budget'] or '—'} | {row['seconds']:.2f} | {row['seconds_vs_full']:.2f} | "
                f"{row['peak_rss_bytes'] / mib:.0f} | {row['added_rss_bytes'] / mib:.0f} | "
                f"{'—' if ratio is None else f'{ratio:.2f}'} |")
        if cuda:
            line += f" {row['peak_cuda_bytes'] / mib:.0f} | {row['peak_cuda_vs_full']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
