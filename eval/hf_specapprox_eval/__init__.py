"""Evaluation beside the library: RULER-style synthetic tasks, RULER's metrics, every method of the registry behind one
call, a resumable runner, per-process benchmarks, the `hf-specapprox` CLI (`cli`) and the embedded-model loader
(`models`). `import hf_specapprox` never imports this package."""

from .bench import bench_table, run_bench
from .methods import HARNESS_METHODS, run_method
from .metrics import load_longbench_jsonl, score, string_match_all, string_match_part
from .runner import markdown_table, plot, read_results, run_eval, summarize
from .tasks import TASKS, Sample, make_sample, make_samples

__all__ = [
    "HARNESS_METHODS", "TASKS", "Sample", "bench_table", "load_longbench_jsonl", "make_sample", "make_samples", "markdown_table", "plot",
    "read_results", "run_bench", "run_eval", "run_method", "score", "string_match_all", "string_match_part", "summarize",
]


def __getattr__(name: str):
    if name == "METHODS":  # renamed in 0.2
        from . import methods

        return methods.METHODS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
