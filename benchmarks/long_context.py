"""The long-context study: time to first token, time per output token, end-to-end time and peak memory of stock
`generate` vs SpecKV (dense / sparse prefill) vs SnapKV on random-weight Llama models, plus one layer's prefill
attention sparse vs dense, and (gpu preset) the largest batch that fits at the longest prompt.

    python benchmarks/long_context.py --preset smoke --json out.json      # < 2 min on 2 CPU cores
    python benchmarks/long_context.py --preset cpu --json benchmarks/results/long_context_cpu.json
    python benchmarks/long_context.py --preset gpu --json benchmarks/results/long_context_gpu.json
    python benchmarks/long_context.py --preset gpu --device cpu --tiny    # the gpu code path at toy sizes

Every (method, prompt length) runs in its own fresh process (gpu preset: every method, lengths in increasing order,
CUDA peaks being per allocation) with the models built and the inputs made before anything is measured. In it, one
warm-up `generate` (kernel selection, compilation) is timed and reported apart as `warmup_s`; then `--runs` timed
calls, reported as medians. TTFT is the time from the call to the first token's logits (a logits processor records
it, after a CUDA synchronisation); TPOT = (total - TTFT) / (new_tokens - 1). No EOS exists, so every call decodes
exactly `new_tokens` tokens, and SpecKV's draft looks ahead as many. Peak memory is what the timed calls add: peak
RSS growth on CPU (`/proc/self/clear_refs` + `VmHWM`), `torch.cuda.max_memory_allocated` above the memory
allocated before the call on CUDA (`peak_mem_total_mib` includes the models). Ratios are against `stock` measured
in the same run.

Methods: `stock` (DynamicCache), `speckv_dense` / `speckv_sparse` (SpecKV with `sparse_prefill="off"` / `"on"`),
`snapkv`, `speckv_nodrop` (SpecKV's sparse prefill keeping every prompt position, `max_capacity_prompt=None`: the
sparse prefill's speed-up without eviction; it decodes on the whole prompt), and `speckv` (SpecKV with the installed
library's defaults). Where the installed `SpecKVConfig` has no
`sparse_prefill` field, the dense/sparse rows say "skipped" and `speckv` is measured in their place. These decode on
the cache's dynamic layers; the `_static` variants (`speckv_dense_static`, `speckv_sparse_static`, `snapkv_static`)
decode on its static layers (`use_static_decode`) with `generate` compiling the decode forward (`CompileConfig`,
full graph, CUDA graphs on GPU; the warm-up call compiles). The `decode` column says which. The cpu preset measures
stock, both SpecKV prefills with dynamic decoding, SpecKV with the sparse prefill and static decoding, and SnapKV;
the gpu preset stock, SpecKV (sparse prefill) with dynamic and with static decoding, and SnapKV (pass `--methods` for
others), then searches at the longest prompt for the largest batch of stock and SpecKV (sparse prefill, dynamic
decoding: a static batch compiles anew) that fits, each trial a single call; the search (and the attention table)
stop at `--deadline-s` (450 s), the measurements never do.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "hf_specapprox").is_dir() and str(ROOT) not in sys.path:  # run from a checkout: use its library
    sys.path.insert(0, str(ROOT))
if (ROOT / "eval" / "hf_specapprox_eval").is_dir() and str(ROOT / "eval") not in sys.path:  # and its harness
    sys.path.insert(0, str(ROOT / "eval"))

METHODS = ("stock", "speckv_dense", "speckv_dense_static", "speckv_sparse", "speckv_sparse_static", "snapkv",
           "snapkv_static", "speckv_nodrop", "speckv")  # speckv: the library's own defaults
SPARSE_KNOB_METHODS = ("speckv_dense", "speckv_sparse", "speckv_nodrop")  # need `SpecKVConfig.sparse_prefill`
DEFAULT_METHODS = ["stock", "speckv_dense", "speckv_sparse", "snapkv"]
STATIC = "_static"  # suffix: decode on the static compressed layers, compiled
MIB = 2**20


def llama(layers, hidden, heads, kv_heads, head_dim, mlp, vocab, tie=False):
    return dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=head_dim, intermediate_size=mlp, vocab_size=vocab, tie_word_embeddings=tie)


PRESETS = {
    # Same code paths as `cpu`, toy sizes; the sparse prefill's knobs shrunk so that it really is sparse at 1-2K.
    "smoke": dict(target=llama(2, 128, 4, 4, 32, 256, 512), draft=llama(1, 64, 2, 2, 32, 128, 512),
                  lengths=[1024, 2048], new_tokens=8, runs=2, budget=128, dtype="float32", device="cpu",
                  sparse=dict(prefill_vertical_size=256, prefill_window_size=256, prefill_block_size=64),
                  attention=True, batch_search=False, max_batch=1, process_per="length"),
    # KV-bound: ~1 GiB of fp32 K/V at 32K dominates a decode step.
    "cpu": dict(target=llama(4, 256, 16, 16, 64, 512, 32000), draft=llama(2, 128, 4, 4, 32, 256, 32000),
                lengths=[8192, 16384, 32768], new_tokens=128, runs=3, budget=1024, dtype="float32", device="cpu",
                methods=DEFAULT_METHODS + ["speckv_sparse_static"], sparse={}, attention=True, batch_search=False,
                max_batch=1, process_per="length"),
    # Llama-3-8B-shaped target, Llama-3.2-1B-shaped draft.
    "gpu": dict(target=llama(32, 4096, 32, 8, 128, 14336, 128256),
                draft=llama(16, 2048, 32, 8, 64, 8192, 128256, tie=True),
                lengths=[32768, 131072], new_tokens=256, runs=2, budget=1024, dtype="bfloat16", device="cuda",
                methods=["stock", "speckv_sparse", "speckv_sparse_static", "snapkv"], sparse={}, attention=True,
                batch_search=True, max_batch=64, process_per="method", deadline_s=450),
}
TINY_GPU = dict(target=llama(2, 64, 4, 2, 16, 128, 256), draft=llama(1, 32, 2, 2, 16, 64, 256, tie=True),
                lengths=[256, 512], new_tokens=4, budget=64, max_batch=4,
                sparse=dict(prefill_vertical_size=64, prefill_window_size=64, prefill_block_size=16))


# ---------------------------------------------------------------------------------------------------------- helpers
def base_method(method):
    """The method without its decoding variant: `speckv_sparse_static` -> `speckv_sparse`."""
    return method.removesuffix(STATIC)


def decode_kind(method):
    return "static, compiled" if method.endswith(STATIC) else "dynamic"


def static_decode_supported():
    from hf_specapprox import SnapKVCache

    return hasattr(SnapKVCache, "use_static_decode")


def sparse_prefill_supported():
    from hf_specapprox import SpecKVConfig

    return "sparse_prefill" in {field.name for field in dataclasses.fields(SpecKVConfig)}


def vertical_slash():
    try:
        from hf_specapprox.kernels.sparse_attention import vertical_slash_attention
    except ImportError:
        return None
    return vertical_slash_attention


try:  # the project's peak-RSS helpers (hf_specapprox_eval/bench.py)
    from hf_specapprox_eval.bench import _proc_status, _reset_peak_rss
except ImportError:  # pragma: no cover - older checkouts
    def _proc_status():
        values = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024
        return values

    def _reset_peak_rss():
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False


def build(spec, seed, device, dtype, max_positions):
    """A random-weight Llama built directly on `device` in `dtype` (no CPU copy of the big GPU models)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**spec, max_position_embeddings=max_positions, bos_token_id=None, eos_token_id=None,
                         pad_token_id=0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def trial(method, length, batch, new_tokens, total_s=None, peak_mem_mib=None, stop=None):
    """One batch-search result; `total_s=None`: it did not fit."""
    return dict(method=method, prompt_tokens=length, batch=batch, fits=total_s is not None, total_s=total_s,
                tokens_per_s=None if total_s is None else batch * new_tokens / total_s, peak_mem_mib=peak_mem_mib,
                stop=stop)


def median(values):
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------------------------------------- worker
class Worker:
    """Runs one method in this (fresh) process: models built and inputs made before anything is measured."""

    def __init__(self, job):
        import torch

        self.torch, self.job = torch, job
        if job.get("threads"):
            torch.set_num_threads(job["threads"])
        self.device = torch.device(job["device"])
        self.cuda = self.device.type == "cuda"
        self.dtype = getattr(torch, job["dtype"])
        max_positions = max(job["lengths"]) + 2 * job["new_tokens"] + 64
        self.target = build(job["target"], 0, self.device, self.dtype, max_positions)
        self.draft = None
        if job["method"].startswith("speckv"):
            self.draft = build(job["draft"], 1, self.device, self.dtype, max_positions)
        import hf_specapprox

        self.hs = hf_specapprox
        if job["method"] != "stock":
            hf_specapprox.bind(self.target)
        self.cache_name = hf_specapprox.compat.cache_kwarg_name(self.target)
        self.static = job["method"].endswith(STATIC)
        self.compile_config = None
        if self.static:
            from transformers import CompileConfig

            self.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead" if self.cuda else None)
            self.compile_config._compile_all_devices = True  # transformers compiles on CPU only when asked to

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def inputs(self, length, batch):
        generator = self.torch.Generator().manual_seed(length + batch)
        ids = self.torch.randint(3, self.job["target"]["vocab_size"], (batch, length), generator=generator)
        ids = ids.to(self.device)
        return ids, self.torch.ones_like(ids)

    def cache(self):
        job, method = self.job, base_method(self.job["method"])
        if method == "stock":
            return None
        if method == "snapkv":
            cache = self.hs.SnapKVCache(max_capacity_prompt=job["budget"], window_size=32)
        else:
            mode = {"speckv_dense": "off", "speckv_sparse": "on", "speckv_nodrop": "on"}.get(method)
            sparse = {} if mode is None else dict(job["sparse"], sparse_prefill=mode)
            budget = None if method == "speckv_nodrop" else job["budget"]
            cache = self.hs.SpecKVCache(draft=self.draft, max_capacity_prompt=budget, window_size=32,
                                        lookahead_tokens=job["new_tokens"], **sparse)
        return cache.use_static_decode(job["new_tokens"]) if self.static else cache

    def generate(self, ids, mask, new=None):
        """One timed `generate` call: (ttft_s, tpot_s, total_s, peak growth bytes, peak total bytes)."""
        torch, new = self.torch, new or self.job["new_tokens"]
        from transformers import LogitsProcessor, LogitsProcessorList

        worker = self

        class FirstToken(LogitsProcessor):
            time = None

            def __call__(self, input_ids, scores):
                if self.time is None:
                    worker.sync()
                    self.time = time.perf_counter()
                return scores

        timer, cache = FirstToken(), self.cache()
        kwargs = {} if cache is None else {self.cache_name: cache}
        if self.compile_config is not None:
            kwargs["compile_config"] = self.compile_config
        gc.collect()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        else:
            _reset_peak_rss()
            before = _proc_status().get("VmRSS", 0)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                       do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([timer]),
                                       **kwargs)
        self.sync()
        total = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else _proc_status().get("VmHWM", 0)
        assert out.shape[1] == ids.shape[1] + new, f"decoded {out.shape[1] - ids.shape[1]} tokens, not {new}"
        if self.static:  # the row says "static": the prefill installed the static layers generate can compile
            assert cache.is_compileable, "the static compressed layers were not installed"
        ttft = timer.time - start
        tpot = (total - ttft) / (new - 1) if new > 1 else None
        del out, cache
        # the kernel's RSS counters lag by a few pages per thread: a growth within that reads as slightly negative
        return ttft, tpot, total, max(peak - before, 0), peak

    def measure(self, length, batch):
        ids, mask = self.inputs(length, batch)
        warm = self.generate(ids, mask)
        runs = [self.generate(ids, mask) for _ in range(self.job["runs"])]
        return dict(method=self.job["method"], prompt_tokens=length, new_tokens=self.job["new_tokens"], batch=batch,
                    ttft_s=median([r[0] for r in runs]),
                    tpot_s=median([r[1] for r in runs]) if self.job["new_tokens"] > 1 else None,
                    total_s=median([r[2] for r in runs]), peak_mem_mib=max(r[3] for r in runs) / MIB,
                    peak_mem_total_mib=max(r[4] for r in runs) / MIB, decode=decode_kind(self.job["method"]),
                    warmup_s=warm[2],
                    runs=[dict(ttft_s=r[0], tpot_s=r[1], total_s=r[2], peak_mem_mib=r[3] / MIB) for r in runs],
                    skipped=None)

    def batch_search(self, length, first):
        """The largest batch that fits at `length`, with its throughput: on CUDA the first batch tried is the largest
        power of two that the measured batch's peak memory predicts to fit (at least twice the measured batch), on
        CPU twice the measured batch; then doubling until out of memory, `max_batch` or the deadline (a trial is
        not started unless its time, predicted linear in the batch, ends before it); after an out-of-memory, or
        where the deadline forbids a batch, the batch is halved while that is still larger than the largest one known
        to fit."""
        torch, new, method = self.torch, self.job["new_tokens"], self.job["method"]
        out_of_memory = getattr(torch, "OutOfMemoryError", RuntimeError)
        fitted, last_total = first["batch"], first["total_s"]
        trials = [trial(method, length, fitted, new, last_total, first["peak_mem_mib"])]
        batch = 2 * fitted
        if self.cuda and first["peak_mem_mib"] > 0:
            room = torch.cuda.get_device_properties(self.device).total_memory - torch.cuda.memory_allocated(self.device)
            predicted = int((room - 2 * 2**30) / (first["peak_mem_mib"] * MIB / fitted))
            while 2 * batch <= min(predicted, self.job["max_batch"]):
                batch *= 2
        ids, mask = self.inputs(min(length, 256), 1)
        self.generate(ids, mask, new=2)  # first-call costs of this process, outside the trials
        failed = None
        while True:
            stop = None
            if batch > self.job["max_batch"]:
                stop = f"cap {self.job['max_batch']}"
            elif failed is not None and batch >= failed:
                stop = f"batch {failed} did not fit"
            elif self.job.get("deadline") and time.time() + 1.2 * last_total * batch / fitted > self.job["deadline"]:
                if batch // 2 > fitted:  # a smaller batch may still finish in time
                    batch //= 2
                    continue
                stop = f"time (batch {batch} not tried)"
            if stop:
                trials[-1]["stop"] = stop
                return trials
            try:
                ids = mask = None
                ids, mask = self.inputs(length, batch)
                _, _, total, growth, _ = self.generate(ids, mask)
            except Exception as error:
                ids = mask = None
                if not (isinstance(error, out_of_memory) or "out of memory" in str(error).lower()):
                    traceback.print_exc()
                    reason = f"failed: {type(error).__name__}: {error}"[:300]
                    trials.append(trial(method, length, batch, new, stop=reason))
                    return trials
                gc.collect()
                if self.cuda:
                    torch.cuda.empty_cache()
                trials.append(trial(method, length, batch, new, stop="out of memory"))
                failed = batch
                if batch // 2 > fitted:
                    batch //= 2
                    continue
                return trials
            trials.append(trial(method, length, batch, new, total, growth / MIB))
            fitted, last_total, batch = batch, total, batch * 2


def attention_row(job, length, skipped=None):
    target = job["target"]
    return dict(prompt_tokens=length, heads=target["num_attention_heads"], kv_heads=target["num_key_value_heads"],
                head_dim=target["head_dim"], **job["attention"], dense_s=None, sparse_s=None, sparse_vs_dense=None,
                skipped=skipped)


def attention_worker(job):
    """One layer's prefill attention at each length: causal SDPA vs `vertical_slash_attention`."""
    import torch
    import torch.nn.functional as F

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    sparse = vertical_slash()
    device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
    heads, kv_heads = job["target"]["num_attention_heads"], job["target"]["num_key_value_heads"]
    dim, knobs = job["target"]["head_dim"], job["attention"]

    def timed(fn):
        fn()  # warm-up
        times = []
        for _ in range(job["runs"]):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return median(times), times

    def one_attention(length, row):
        generator = torch.Generator().manual_seed(length)
        q = torch.randn(1, heads, length, dim, generator=generator).to(device, dtype)
        k = torch.randn(1, kv_heads, length, dim, generator=generator).to(device, dtype)
        v = torch.randn(1, kv_heads, length, dim, generator=generator).to(device, dtype)
        count = min(knobs["vertical"], length)
        vertical = torch.rand(1, kv_heads, length, generator=generator).topk(count, dim=-1).indices.sort(-1).values
        vertical = vertical.to(device)
        scaling = dim**-0.5
        expanded = (k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1))
        with torch.no_grad():
            row["dense_s"], row["dense_runs"] = timed(lambda: F.scaled_dot_product_attention(
                q, *expanded, is_causal=True, scale=scaling))
            row["sparse_s"], row["sparse_runs"] = timed(lambda: sparse(
                q, k, v, vertical, scaling=scaling, window_size=knobs["window"], block_size=knobs["block"]))
        row["sparse_vs_dense"] = row["sparse_s"] / row["dense_s"]
        return row

    rows = []
    for length in job["lengths"]:
        row = attention_row(job, length)
        if sparse is None:
            rows.append(dict(row, skipped="hf_specapprox.kernels.sparse_attention.vertical_slash_attention is not installed"))
            continue
        try:
            rows.append(one_attention(length, row))
        except Exception as error:  # e.g. out of memory: report it, go on
            traceback.print_exc()
            rows.append(dict(row, skipped=f"failed: {type(error).__name__}: {error}"[:300]))
    return rows


def worker_main(job):
    if job["method"] == "attention":
        return dict(attention=attention_worker(job))
    worker = Worker(job)
    if job.get("search_from"):  # the batch search, after every method's measurements
        rows, search = [], worker.batch_search(job["lengths"][0], job["search_from"])
    else:
        rows, search = [], []
        for length in job["lengths"]:
            try:
                rows.append(worker.measure(length, job["batch"]))
            except Exception as error:  # e.g. out of memory at the longest prompt: keep the shorter ones' rows
                traceback.print_exc()
                rows.append(skipped_row(job["method"], length, job, f"failed: {type(error).__name__}: {error}"[:300]))
                gc.collect()
                if worker.cuda:
                    worker.torch.cuda.empty_cache()
    name = worker.torch.cuda.get_device_name(worker.device) if worker.cuda else None
    return dict(rows=rows, batch_search=search, device_name=name)


# ----------------------------------------------------------------------------------------------------------- parent
def spawn(job, timeout=None):
    """Runs `job` in a fresh process of this script; returns its result, or `{"error": ...}`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job), "--worker-out", str(out)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout)[-3000:]
            print(f"worker {job['method']} {job['lengths']} failed (exit {done.returncode}):\n{tail}", file=sys.stderr)
            last = tail.strip().splitlines()[-1] if tail.strip() else ""
            return {"error": f"failed (exit {done.returncode}): {last}"}
        return json.loads(out.read_text())


def skipped_row(method, length, job, reason):
    return dict(method=method, prompt_tokens=length, new_tokens=job["new_tokens"], batch=job["batch"], ttft_s=None,
                tpot_s=None, total_s=None, peak_mem_mib=None, peak_mem_total_mib=None, decode=decode_kind(method),
                warmup_s=None, runs=[], skipped=reason)


def add_ratios(rows):
    keys = ("ttft", "tpot", "total", "peak_mem")
    for row in rows:
        base = next((r for r in rows if r["method"] == "stock" and r["prompt_tokens"] == row["prompt_tokens"]
                     and r["batch"] == row["batch"] and not r["skipped"]), None)
        for key in keys:
            field = "peak_mem_mib" if key == "peak_mem" else f"{key}_s"
            ok = base is not None and row[field] is not None and base[field]
            row[f"{key}_ratio"] = row[field] / base[field] if ok else None


def fmt(value, spec=".2f", scale=1.0):
    return "—" if value is None else format(value * scale, spec)


def table(rows):
    lines = ["| method | decode | prompt | batch | new | warm-up s | TTFT s | ×stock | TPOT ms | ×stock | total s "
             "| ×stock | peak MiB | ×stock |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["skipped"]:
            lines.append(f"| {r['method']} | {r['decode']} | {r['prompt_tokens']} | {r['batch']} | {r['new_tokens']} "
                         f"| skipped: {r['skipped']} |||||||||")
            continue
        lines.append(
            f"| {r['method']} | {r['decode']} | {r['prompt_tokens']} | {r['batch']} | {r['new_tokens']} "
            f"| {fmt(r['warmup_s'])} | {fmt(r['ttft_s'], '.3f')} | {fmt(r['ttft_ratio'])} "
            f"| {fmt(r['tpot_s'], '.2f', 1e3)} | {fmt(r['tpot_ratio'])} | {fmt(r['total_s'], '.3f')} "
            f"| {fmt(r['total_ratio'])} | {fmt(r['peak_mem_mib'], '.0f')} | {fmt(r['peak_mem_ratio'])} |")
    return "\n".join(lines)


def attention_table(rows):
    lines = ["| prompt | heads (q/kv × dim) | vertical | window | block | dense SDPA s | vertical-slash s "
             "| sparse/dense |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['heads']}/{r['kv_heads']} × {r['head_dim']}"
        if r["skipped"]:
            lines.append(f"| {r['prompt_tokens']} | {shape} | {r['vertical']} | {r['window']} | {r['block']} "
                         f"| skipped: {r['skipped']} |||")
        else:
            lines.append(f"| {r['prompt_tokens']} | {shape} | {r['vertical']} | {r['window']} | {r['block']} "
                         f"| {r['dense_s']:.4f} | {r['sparse_s']:.4f} | {r['sparse_vs_dense']:.2f} |")
    return "\n".join(lines)


def search_table(trials):
    lines = ["| method | prompt | batch | fits | total s | tokens/s | peak MiB | stopped by |",
             "|---|---|---|---|---|---|---|---|"]
    for t in trials:
        lines.append(f"| {t['method']} | {t['prompt_tokens']} | {t['batch']} | {'yes' if t['fits'] else 'no'} "
                     f"| {fmt(t['total_s'])} | {fmt(t['tokens_per_s'], '.1f')} | {fmt(t['peak_mem_mib'], '.0f')} "
                     f"| {t['stop'] or ''} |")
    return "\n".join(lines)


def machine(device_name):
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} CPUs"
    return f"{device_name}; {text}" if device_name else text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--tiny", action="store_true", help="toy model sizes (test the gpu preset's path on CPU)")
    parser.add_argument("--lengths", help="comma-separated prompt lengths (tokens)")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--runs", type=int,
                        help="timed runs per method and length, after one warm-up (default: smoke 2, cpu 3, gpu 2)")
    parser.add_argument("--methods", help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--budget", type=int, help="KV budget per layer and KV head (default 1024)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, help="torch threads in the workers")
    parser.add_argument("--max-batch", type=int, help="cap of the batch search (gpu preset)")
    parser.add_argument("--deadline-s", type=float, help="the batch search stops before this many seconds in")
    parser.add_argument("--attention", choices=["on", "off"], help="the one-layer attention table")
    parser.add_argument("--json", help="write {rows, attention, batch_search, meta} here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        result = worker_main(json.loads(args.worker))
        Path(args.worker_out).write_text(json.dumps(result))
        return result
    started = time.time()
    preset = dict(PRESETS[args.preset])
    if args.tiny:
        preset.update(TINY_GPU)
    device = args.device or preset["device"]
    dtype = args.dtype or preset["dtype"]
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else preset["lengths"]
    methods = args.methods.split(",") if args.methods else preset.get("methods", DEFAULT_METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
    sparse_ok = sparse_prefill_supported()
    if not sparse_ok and set(SPARSE_KNOB_METHODS) & {base_method(method) for method in methods}:
        methods.append("speckv")  # their rows say skipped; SpecKV as the installed library runs it stands in
    methods = sorted(set(methods), key=METHODS.index)  # stock first: the baseline
    budget = args.budget or preset["budget"]
    deadline_s = args.deadline_s or preset.get("deadline_s")
    knobs = dict(preset["sparse"])
    attention_knobs = dict(vertical=knobs.get("prefill_vertical_size", 2048),
                           window=knobs.get("prefill_window_size", 2048), block=knobs.get("prefill_block_size", 64))
    if sparse_ok:  # pass only the knobs this SpecKVConfig has
        from hf_specapprox import SpecKVConfig

        names = {field.name for field in dataclasses.fields(SpecKVConfig)}
        knobs = {key: value for key, value in knobs.items() if key in names}
    job = dict(target=preset["target"], draft=preset["draft"], new_tokens=args.new_tokens or preset["new_tokens"],
               runs=args.runs or preset["runs"], budget=budget, batch=args.batch, device=device, dtype=dtype,
               threads=args.threads, sparse=knobs, max_batch=args.max_batch or preset["max_batch"],
               batch_search=preset["batch_search"], deadline=started + deadline_s if deadline_s else None)
    search_methods = ["stock", "speckv_sparse" if sparse_ok else "speckv"]  # SpecKV as the library runs it today

    rows, trials, device_name = [], [], None
    for method in methods:
        reason = None
        if base_method(method) in SPARSE_KNOB_METHODS and not sparse_ok:
            reason = "this hf_specapprox's SpecKVConfig has no `sparse_prefill` field"
        elif method.endswith(STATIC) and not static_decode_supported():
            reason = "this hf_specapprox's caches have no `use_static_decode`"
        if reason:
            rows += [skipped_row(method, length, job, reason) for length in lengths]
            continue
        groups = [lengths] if preset["process_per"] == "method" else [[length] for length in lengths]
        for group in groups:
            result = spawn(dict(job, method=method, lengths=group))
            if "error" in result:
                rows += [skipped_row(method, length, job, result["error"]) for length in group]
                continue
            rows += result["rows"]
            trials += result["batch_search"]
            for row in result["rows"]:  # progress, so that a run cut short still shows what it measured
                print(f"# {time.time() - started:.0f} s: {row['method']} at {row['prompt_tokens']}: "
                      + (f"skipped ({row['skipped']})" if row["skipped"] else
                         f"TTFT {row['ttft_s']:.3f} s, total {row['total_s']:.3f} s, warm-up {row['warmup_s']:.2f} s"),
                      file=sys.stderr, flush=True)
            device_name = device_name or result["device_name"]
    rows.sort(key=lambda r: (r["prompt_tokens"], r["batch"], METHODS.index(r["method"])))
    add_ratios(rows)

    # Largest batch at the longest prompt: doubling from the measured batch, each method with an equal share of the
    # time left before the deadline (the measurements above are never cut short by it).
    firsts = [r for r in rows if job["batch_search"] and r["method"] in search_methods and not r["skipped"]
              and r["prompt_tokens"] == max(lengths)]
    for index, first in enumerate(firsts):
        share = None
        if job["deadline"]:
            share = time.time() + (job["deadline"] - time.time()) / (len(firsts) - index)
        measured = trial(first["method"], first["prompt_tokens"], first["batch"], first["new_tokens"],
                         first["total_s"], first["peak_mem_mib"], stop="past the deadline")
        if share is not None and share <= time.time():
            trials.append(measured)
            continue
        result = spawn(dict(job, method=first["method"], lengths=[first["prompt_tokens"]], deadline=share,
                            search_from={key: first[key] for key in ("batch", "total_s", "peak_mem_mib")}))
        trials += result.get("batch_search") or [dict(measured, stop=result.get("error"))]

    attention, attention_job = [], dict(job, method="attention", lengths=lengths, attention=attention_knobs)
    if (args.attention or ("on" if preset["attention"] else "off")) == "on":
        if deadline_s and time.time() > started + deadline_s:
            attention = [attention_row(attention_job, length, "past the deadline") for length in lengths]
        else:
            result = spawn(attention_job)
            attention = result.get("attention") or [attention_row(attention_job, length, result["error"])
                                                    for length in lengths]

    import torch
    import transformers

    import hf_specapprox

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except OSError:
        commit = None
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                machine=machine(device_name), torch=torch.__version__, transformers=transformers.__version__,
                hf_specapprox=hf_specapprox.__version__, commit=commit, python=platform.python_version(),
                preset=args.preset, tiny=args.tiny, device=device, dtype=dtype, threads=args.threads or "default",
                lengths=lengths, methods=methods, new_tokens=job["new_tokens"], runs=job["runs"], warmup_runs=1,
                budget=budget, window_size=32, lookahead_tokens=job["new_tokens"], batch=args.batch,
                sparse_prefill_supported=sparse_ok, static_decode_supported=static_decode_supported(),
                static_compile="CompileConfig(fullgraph=True, mode='reduce-overhead' on CUDA, None on CPU)",
                sparse_knobs=knobs, vertical_slash_available=vertical_slash()
                is not None, target=preset["target"], draft=preset["draft"], attn_implementation="sdpa",
                peak_mem="growth during the timed calls: peak RSS (CPU) or max_memory_allocated (CUDA) above "
                         "the memory before the call; peak_mem_total_mib includes the models",
                wall_s=time.time() - started)
    print(f"# long-context study, preset {args.preset}{' (tiny)' if args.tiny else ''}: {meta['machine']}; "
          f"torch {meta['torch']}, transformers {meta['transformers']}, {dtype}, budget {budget}, "
          f"{job['new_tokens']} new tokens, medians of {job['runs']} runs after 1 warm-up\n")
    print(table(rows))
    if attention:
        print("\nOne layer's prefill attention, dense causal SDPA vs vertical-slash:\n")
        print(attention_table(attention))
    if trials:
        print(f"\nBatch search at {max(lengths)} tokens (doubling, cap {job['max_batch']}):\n")
        print(search_table(trials))
    print(f"\nwall time {meta['wall_s']:.1f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(rows=rows, attention=attention, batch_search=trials, meta=meta),
                                              indent=1) + "\n")
    return dict(rows=rows, attention=attention, batch_search=trials, meta=meta)


if __name__ == "__main__":
    main()
