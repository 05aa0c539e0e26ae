"""Evaluation beside the library: RULER-style synthetic tasks, RULER's metrics, every method of the registry behind one
call, a resumable runner, per-process benchmarks, the `hf-specapprox` CLI (`cli`) and the embedded-model loader
(`models`). `import hf_specapprox` never imports this package."""

from .bench import bench_table, run_bench
from .methods import METHODS, run_method
from .metrics import load_longbench_jsonl, score, string_match_all, string_match_part
from .runner import markdown_table, plot, read_results, run_eval, summarize
from .tasks import TASKS, Sample, make_sample, make_samples

__all__ = [
    "METHODS", "TASKS", "Sample", "bench_table", "load_longbench_jsonl", "make_sample", "make_samples", "markdown_table", "plot",
    "read_results", "run_bench", "run_eval", "run_method", "score", "string_match_all", "string_match_part", "summarize",
]
