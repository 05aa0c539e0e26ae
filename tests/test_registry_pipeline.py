"""The method registry, the pipeline's per-call method and knobs, its per-row stats, and a core that stands alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import pipeline

import hf_specapprox as hs
from hf_specapprox.integrations import registry
from tiny_models import tiny_model, tiny_tokenizer, words

ROOT = Path(__file__).resolve().parents[1]
SPECKV = hs.SpecKVConfig(max_capacity_prompt=16, window_size=4, lookahead_tokens=4)
SPECPC = hs.SpecPCConfig(max_capacity_prompt=24, window_size=4, kernel_size=3, starting_layer_index=1,
                         lookahead_tokens=5)
SNAPKV = hs.SnapKVConfig(max_capacity_prompt=16, window_size=4)


@pytest.fixture(scope="module")
def models():
    return tiny_model("qwen2", seed=41, num_heads=4, num_kv_heads=2), tiny_model("llama", seed=42, num_layers=2)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def pipe(models, tokenizer):
    target, draft = models
    return pipeline("speckv-text-generation", model=target, tokenizer=tokenizer, draft_model=draft,
                    speckv_config=SPECKV, specpc_config=SPECPC)


@pytest.mark.slow  # a fresh interpreter: the floor and newest envs
def test_importing_the_core_loads_no_evaluation_cli_or_model_loading_code():
    code = "import hf_specapprox, sys; print(sorted(m for m in sys.modules if m.startswith('hf_specapprox')))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = eval(done.stdout.strip().splitlines()[-1])  # a list literal of module names
    assert "hf_specapprox" in loaded and "hf_specapprox.integrations.registry" in loaded
    for name in loaded:
        assert not name.startswith("hf_specapprox_eval"), name
        assert name.split(".")[1:2] not in (["eval"], ["cli"], ["models"]), name
    import importlib.util

    for moved in ("hf_specapprox.eval", "hf_specapprox.cli", "hf_specapprox.models"):
        assert importlib.util.find_spec(moved) is None, moved


def test_the_pipeline_the_harness_and_the_cli_read_one_registry():
    from hf_specapprox_eval import HARNESS_METHODS
    from hf_specapprox_eval.cli import build_parser

    names = list(registry.METHODS)
    # the paper's methods and baselines, and Knorm (registered with one line: it must appear everywhere by itself)
    assert set(names) >= {"full", "speckv", "snapkv", "streamingllm", "knorm", "specpc", "specprefill", "speckv_pc"}
    with pytest.warns(FutureWarning, match="registry.METHODS"):  # one list of methods; the old name warns
        assert hs.integrations.pipeline.METHODS == tuple(names)
    variants = {f"{name}+pyramid": "kv" for name in ("speckv", "snapkv", "streamingllm", "knorm", "speckv_pc")}
    variants.update({f"{name}+dense": "kv" for name in ("speckv", "speckv_pc")})  # sparse prefill by default
    variants["speckv+nodrop"] = "kv"  # the sparse prefill without eviction
    variants["specprefill+genconfig"] = "prompt"  # SpecPrefill's draft with the checkpoint's generation config
    assert HARNESS_METHODS == {"draft": None, **{name: spec.budget for name, spec in registry.METHODS.items()},
                               **variants}
    assert HARNESS_METHODS["knorm"] == "kv" and HARNESS_METHODS["specpc"] == "prompt"
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in ("eval", "bench"):
        choices = next(a.choices for a in commands[command]._actions if a.dest == "methods")
        assert choices == sorted(HARNESS_METHODS)
    assert registry.get_method("speckv-pc") is registry.get_method("speckv_pc")
    with pytest.raises(ValueError, match="choose from"):
        registry.get_method("h2o")


def test_registry_build_checks_its_arguments(models):
    _, draft = models
    spec = registry.get_method("speckv")
    with pytest.raises(TypeError, match=r"takes \['speckv_config'\], not \['specpc_config'\]"):
        spec.build(draft, specpc_config=SPECPC)
    with pytest.raises(TypeError, match="must be a SpecKVConfig"):
        spec.build(draft, speckv_config=SNAPKV)
    with pytest.raises(ValueError, match="needs a draft model"):
        spec.build(None)
    edited = hs.SpecKVConfig(max_capacity_prompt=16, window_size=4)
    edited.window_size = 20  # edited after construction: validated at use
    with pytest.raises(ValueError, match="must be larger than `window_size`"):
        spec.build(draft, speckv_config=edited)


def test_method_and_knobs_per_call(pipe, models, tokenizer):
    # Before: `pipe(x, method="specpc")` failed with "model_kwargs ... not used".
    target, draft = models
    prompt = words(50, 1)
    record = pipe(prompt, max_new_tokens=4, do_sample=False, return_full_text=False, method="specpc")[0]
    stats = record["hf_specapprox"]
    assert stats["specpc_kept_tokens"] == 24 and "kv_kept_per_layer" not in stats
    compressed = hs.SpecPCPreprocessor(draft, config=SPECPC)(**tokenizer(prompt, return_tensors="pt"))
    manual = target.generate(**compressed.model_inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = tokenizer.decode(manual[0, compressed.input_ids.shape[1] :], skip_special_tokens=True)
    assert record["generated_text"].strip() == expected.strip()

    small = hs.SpecPCConfig(max_capacity_prompt=12, window_size=4, kernel_size=3, starting_layer_index=1)
    stats = pipe(prompt, max_new_tokens=2, do_sample=False, method="speckv-pc", specpc_config=small)[0]["hf_specapprox"]
    assert stats["specpc_kept_tokens"] == 12 and stats["kv_kept_per_layer"] is None  # 12 <= SpecKV's 16: no drop
    stats = pipe(prompt, max_new_tokens=2, do_sample=False)[0]["hf_specapprox"]  # the construction default again
    assert stats["kv_kept_per_layer"] == 16 and "specpc_kept_tokens" not in stats
    stats = pipe(prompt, max_new_tokens=2, do_sample=False, method="snapkv", snapkv_config=SNAPKV)[0]["hf_specapprox"]
    assert stats["kv_kept_per_layer"] == 16 and stats["draft_agreement"] is None
    with pytest.raises(ValueError, match="choose from"):
        pipe(prompt, max_new_tokens=2, method="lingua")


def test_kv_kept_counts_the_real_tokens_of_each_row(pipe):
    # Before: a 10-token row batched with a 30-token one reported 16 (the budget; 7 of them padding). Counted as
    # `max_capacity_prompt` counts (the re-fed last prompt token apart): 16 of the long row's first 29 tokens, and
    # all 9 of the short row's.
    prompts = [words(30, 2), words(10, 3)]
    records = pipe(prompts, max_new_tokens=3, do_sample=False, batch_size=2)
    assert [r[0]["hf_specapprox"]["prompt_tokens"] for r in records] == [30, 10]
    assert [r[0]["hf_specapprox"]["kv_kept_per_layer"] for r in records] == [16, 9]


def test_stats_per_row_with_beams(pipe):
    prompts = [words(30, 4), words(10, 5)]
    records = pipe(prompts, max_new_tokens=3, do_sample=False, batch_size=2, num_beams=3, num_return_sequences=2,
                   method="snapkv", snapkv_config=SNAPKV)
    assert [len(r) for r in records] == [2, 2]
    assert [[item["hf_specapprox"]["kv_kept_per_layer"] for item in r] for r in records] == [[16, 16], [9, 9]]
    assert [[item["hf_specapprox"]["prompt_tokens"] for item in r] for r in records] == [[30, 30], [10, 10]]


def test_pipeline_without_a_draft_runs_the_draft_free_methods(models, tokenizer):
    target, _ = models
    pipe = pipeline("speckv-text-generation", model=target, tokenizer=tokenizer, method="streamingllm",
                    streamingllm_config=hs.StreamingLLMConfig(max_capacity_prompt=12, num_sink_tokens=2))
    assert pipe(words(30, 6), max_new_tokens=2, do_sample=False)[0]["hf_specapprox"]["kv_kept_per_layer"] == 12
    with pytest.raises(ValueError, match="draft_model="):
        pipe(words(30, 6), max_new_tokens=2, method="speckv")
    with pytest.raises(ValueError, match="draft_model="):
        pipeline("speckv-text-generation", model=target, tokenizer=tokenizer)


def test_triton_fallback_warns_once(monkeypatch, caplog):
    """`implementation="auto"` on CUDA tensors without a usable Triton scores with torch and says so."""
    from hf_specapprox import kernels as scoring

    class CudaLooking(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    monkeypatch.setattr(scoring, "triton_is_usable", lambda: False)
    queries = torch.randn(1, 2, 3, 4).as_subclass(CudaLooking)
    keys = torch.randn(1, 1, 5, 4)
    with caplog.at_level("WARNING"):
        scores = scoring.window_scores(queries, keys, scaling=0.5, query_offset=2)
    expected = scoring.window_scores(torch.Tensor(queries), keys, scaling=0.5, query_offset=2, implementation="torch")
    torch.testing.assert_close(torch.Tensor(scores), expected)
    assert "Triton is not usable here" in caplog.text


def test_one_rule_for_default_budgets():
    """Issue 28, item 7: the pipeline's SpecKV default (once 256) and the cache's (1024) disagreed. A method's defaults
    are its config class's; SpecKV-PC's are the released ones."""
    for name, spec in registry.METHODS.items():
        defaults = spec.default_configs()
        for argument, config_class in zip(spec.config_arguments, spec.config_classes):
            if name in ("speckv_pc", "specprefill"):
                continue
            assert defaults[argument] == config_class(), (name, argument)
    assert registry.METHODS["speckv"].default_configs()["speckv_config"].max_capacity_prompt == \
        hs.SpecKVCache(draft=torch.nn.Linear(1, 1)).config.max_capacity_prompt == 1024
