"""`benchmarks/long_context.py`: the smoke preset's JSON schema, and the gpu preset's code path (batch search included)
at toy sizes on CPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "long_context.py"
ROW_KEYS = {"method", "prompt_tokens", "new_tokens", "batch", "ttft_s", "tpot_s", "total_s", "peak_mem_mib", "decode",
            "warmup_s", "runs", "ttft_ratio", "tpot_ratio", "total_ratio", "peak_mem_ratio"}
RATIOS = ("ttft_ratio", "tpot_ratio", "total_ratio")


def load():
    spec = importlib.util.spec_from_file_location("long_context", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sparse_prefill_supported():
    from hf_specapprox import SpecKVConfig

    return "sparse_prefill" in {field.name for field in dataclasses.fields(SpecKVConfig)}


def run(tmp_path, *args):
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout


def check_rows(result, methods, lengths):
    rows = result["rows"]
    assert [(row["method"], row["prompt_tokens"]) for row in rows] == [
        (method, length) for length in lengths for method in methods]
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["decode"] == ("static, compiled" if row["method"].endswith("_static") else "dynamic")
        if row["skipped"]:  # only SpecKV's dense/sparse variants, only where the library has no sparse prefill yet
            base = row["method"].removesuffix("_static")
            assert base in ("speckv_dense", "speckv_sparse", "speckv_nodrop") and not sparse_prefill_supported(), row
            assert "sparse_prefill" in row["skipped"]
            continue
        assert row["ttft_s"] > 0 and row["tpot_s"] > 0 and row["total_s"] > row["ttft_s"] and row["warmup_s"] > 0
        assert row["peak_mem_mib"] >= 0
        assert len(row["runs"]) == result["meta"]["runs"]
        assert all(run["total_s"] > 0 for run in row["runs"])
        if row["method"] == "stock":
            assert all(row[key] == 1.0 for key in RATIOS)
            assert row["peak_mem_ratio"] == (1.0 if row["peak_mem_mib"] > 0 else None)
        else:  # a memory growth below 1 MiB for stock leaves no memory ratio
            assert all(row[key] > 0 for key in RATIOS if key != "peak_mem_ratio")
            assert row["peak_mem_ratio"] is None or row["peak_mem_ratio"] >= 0
    return rows


@pytest.mark.slow
def test_smoke_preset_writes_the_schema(tmp_path):
    module = load()
    lengths = [1024]  # the preset's models and budget; one length (a process per method and length), one run
    methods = ["stock", "speckv_sparse", "snapkv", "speckv_nodrop"]
    result, printed = run(tmp_path, "--preset", "smoke", "--lengths", ",".join(map(str, lengths)), "--runs", "1",
                          "--methods", ",".join(methods))
    expected = sorted(methods, key=module.METHODS.index) + ([] if sparse_prefill_supported() else ["speckv"])
    check_rows(result, expected, lengths)
    meta = result["meta"]
    for key in ("date", "machine", "torch", "transformers", "preset", "budget", "runs", "sparse_prefill_supported"):
        assert key in meta
    assert meta["preset"] == "smoke" and meta["sparse_prefill_supported"] == sparse_prefill_supported()
    assert [row["prompt_tokens"] for row in result["attention"]] == lengths
    for row in result["attention"]:
        assert row["skipped"] or (row["dense_s"] > 0 and row["sparse_s"] > 0), row
    assert "| stock | dynamic | 1024 |" in printed and "vertical-slash" in printed


@pytest.mark.slow
@pytest.mark.skipif(transformers.__version__.startswith("4."),
                    reason="the newest env runs the gpu preset's path (its static decode compiles: minutes on a CPU)")
def test_gpu_preset_path_at_tiny_sizes_on_cpu(tmp_path):
    methods = ["stock", "speckv_sparse", "speckv_sparse_static", "speckv"]
    result, printed = run(tmp_path, "--preset", "gpu", "--device", "cpu", "--tiny", "--runs", "1", "--lengths",
                          "128,256", "--methods", ",".join(methods), "--max-batch", "2", "--attention", "off")
    check_rows(result, methods, [128, 256])
    assert result["meta"]["preset"] == "gpu" and result["meta"]["dtype"] == "bfloat16"
    searched = "speckv_sparse" if sparse_prefill_supported() else "speckv"
    trials = result["batch_search"]
    assert [(t["method"], t["batch"]) for t in trials] == [("stock", 1), ("stock", 2), (searched, 1), (searched, 2)]
    assert all(t["fits"] and t["tokens_per_s"] > 0 and t["prompt_tokens"] == 256 for t in trials)
    assert [t["stop"] for t in trials] == [None, "cap 2", None, "cap 2"]
    assert "Batch search at 256 tokens" in printed


def test_presets_and_ratios():
    module = load()
    cpu, gpu = module.PRESETS["cpu"], module.PRESETS["gpu"]
    target = cpu["target"]
    kv_bytes = 2 * target["num_hidden_layers"] * target["num_key_value_heads"] * target["head_dim"] * 4 * 32768
    assert kv_bytes == 2**30 and target["hidden_size"] == 256 and cpu["lengths"] == [8192, 16384, 32768]
    assert (gpu["target"]["num_hidden_layers"], gpu["target"]["num_key_value_heads"], gpu["draft"]["head_dim"]) == (
        32, 8, 64)
    assert "speckv_sparse_static" in gpu["methods"] and "speckv_sparse_static" in cpu["methods"]  # the grid
    assert module.base_method("speckv_sparse_static") == "speckv_sparse" and module.base_method("snapkv") == "snapkv"
    assert module.decode_kind("snapkv_static") == "static, compiled" and module.decode_kind("stock") == "dynamic"
    rows = [dict(method=m, prompt_tokens=8, batch=1, new_tokens=4, ttft_s=t, tpot_s=t / 10, total_s=2 * t,
                 peak_mem_mib=p, decode="dynamic", warmup_s=t, skipped=None)
            for m, t, p in (("stock", 1.0, 10.0), ("snapkv", 0.5, 5.0))]
    rows.append(module.skipped_row("speckv_sparse", 8, dict(new_tokens=4, batch=1), "no sparse_prefill"))
    module.add_ratios(rows)
    assert [r["total_ratio"] for r in rows] == [1.0, 0.5, None] and rows[1]["peak_mem_ratio"] == 0.5
    assert "skipped: no sparse_prefill" in module.table(rows)


class FakeWorker:
    """Stands in for `Worker`'s model calls: a batch above `fits` runs out of memory; a call takes `seconds`."""

    def __init__(self, module, fits, seconds=0.01, deadline=None, max_batch=64):
        import torch

        self.worker = module.Worker.__new__(module.Worker)
        self.worker.torch, self.worker.cuda = torch, False
        self.worker.job = dict(method="stock", new_tokens=4, max_batch=max_batch, deadline=deadline)
        self.worker.inputs = lambda length, batch: (batch, None)
        self.fits, self.seconds, self.tried = fits, seconds, []
        self.worker.generate = self.generate

    def generate(self, batch, mask, new=None):
        import torch

        if new is None:
            self.tried.append(batch)
        if batch > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return 0.0, 0.0, self.seconds * batch, 2**20 * batch, 2**20 * batch


def test_batch_search_stops_at_out_of_memory_cap_and_deadline():
    import time

    module = load()
    first = dict(batch=1, total_s=0.01, peak_mem_mib=1.0)
    fake = FakeWorker(module, fits=4)
    trials = fake.worker.batch_search(64, first)
    assert [(t["batch"], t["fits"]) for t in trials] == [(1, True), (2, True), (4, True), (8, False)]
    assert trials[-1]["stop"] == "out of memory" and trials[2]["tokens_per_s"] == 4 * 4 / 0.04
    trials = FakeWorker(module, fits=64, max_batch=4).worker.batch_search(64, first)
    assert [t["batch"] for t in trials] == [1, 2, 4] and trials[-1]["stop"] == "cap 4"
    slow = FakeWorker(module, fits=64, seconds=100.0, deadline=time.time() + 150)
    trials = slow.worker.batch_search(64, dict(first, total_s=100.0))
    assert slow.tried == [] and trials[-1]["stop"] == "time (batch 2 not tried)"
