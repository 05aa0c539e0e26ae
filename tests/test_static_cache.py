"""The static compressed cache (`cache.use_static_decode(max_new_tokens)`): decoding at fixed shapes after the
compressing prefill, so the decode forward can be compiled.

Checked against independent references: the dynamic path's tokens and logits, the masked-attention oracle
(`tests/oracle.py`), the buffers' addresses across decode steps, and a compile backend that counts the graphs it is
given and the calls they serve (so a silent eager fallback fails the test).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CompileConfig

import hf_specapprox as hs
from hf_specapprox.kv.static_layers import StaticCacheOverflowError, StaticCompressedLayer
from test_oracle import assert_matches_oracle
from tiny_models import random_batch, tiny_model

NEW = 5
GEN = dict(pad_token_id=0, do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", seed=31, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def draft():
    model = tiny_model("llama", seed=32, num_layers=1)
    model.generation_config.eos_token_id = None
    return model


def make_cache(method, draft, static_tokens=None):
    if method == "speckv":
        cache = hs.SpecKVCache(draft=draft, max_capacity_prompt=12, window_size=3, lookahead_tokens=4)
    else:
        cache = hs.SnapKVCache(max_capacity_prompt=12, window_size=3)
    if static_tokens is not None:
        cache.use_static_decode(static_tokens)
    return cache


def generate(model, cache, ids, mask, new_tokens=NEW, expand_size=1, **kwargs):
    """The explicit step, then stock `generate` (the model may be bound or not)."""
    cache.prepare_prefill(model, ids, {"attention_mask": mask}, expand_size=expand_size)
    return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, **{**GEN, **kwargs})


def assert_same(actual, expected, atol=1e-5):
    assert torch.equal(actual.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(actual.logits), torch.stack(expected.logits), atol=atol, rtol=0)


class GraphCounter:
    """A `torch.compile` backend that runs the captured graph eagerly and counts graphs and their calls."""

    def __init__(self):
        self.graphs = 0
        self.calls = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return graph_module.forward(*args)

        return run


def compile_config(counter):
    def backend(graph_module, example_inputs):  # a plain function: `CompileConfig.to_dict` deep-copies objects
        return counter(graph_module, example_inputs)

    config = CompileConfig(backend=backend, fullgraph=True, mode=None)
    config._compile_all_devices = True  # generate compiles on CPU only when asked to
    return config


# ----------------------------------------------------------------------------------------------------------------------
# Same answers as the dynamic path and the oracle
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("method", ["speckv", "snapkv"])
@pytest.mark.parametrize("batch,paddings", [(1, [0]), (3, [0, 7, 2])])
def test_static_greedy_equals_dynamic_and_the_oracle(family, method, batch, paddings, draft):
    target = tiny_model(family, seed=33, num_heads=4, num_kv_heads=2)
    ids, mask = random_batch(batch, 30, paddings, seed=34)
    static = make_cache(method, draft, NEW)
    actual = generate(target, static, ids, mask)
    assert static.is_static and static.is_compileable and static.is_compressed
    layers = [layer for layer in static.layers if isinstance(layer, StaticCompressedLayer)]
    assert len(layers) == len(static.layers)
    for layer in layers:
        assert layer.keys.shape[-2] == 12 + 1 + NEW
        assert layer.num_rows == 12 + NEW  # budget, the re-fed last prompt token, NEW - 1 fed tokens
        assert int(layer.get_seq_length()) == 30 + NEW - 1
    dynamic = make_cache(method, draft)
    expected = generate(target, dynamic, ids, mask)
    assert not dynamic.is_compileable
    assert_same(actual, expected)
    assert_matches_oracle(target, static, ids, mask, actual)


def test_a_prompt_within_the_budget_runs_an_ordinary_prefill_into_the_static_buffers(target, draft):
    ids, mask = random_batch(2, 10, [0, 3], seed=35)
    static = make_cache("snapkv", draft, NEW)
    actual = generate(target, static, ids, mask)
    assert static.is_static and not static.is_compressed
    expected = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, **GEN)
    assert_same(actual, expected)


@pytest.mark.parametrize("method", ["speckv", "snapkv"])
def test_static_beam_search_equals_dynamic_and_reorders_in_place(method, target, draft):
    ids, mask = random_batch(2, 30, [0, 6], seed=36)
    beams = dict(num_beams=3, num_return_sequences=2, output_scores=True, output_logits=False)
    static = make_cache(method, draft, NEW)
    static.prepare_prefill(target, ids, {"attention_mask": mask}, expand_size=3)
    pointers = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in static.layers]
    actual = target.generate(input_ids=ids, attention_mask=mask, past_key_values=static, max_new_tokens=NEW,
                             min_new_tokens=NEW, **{**GEN, **beams})
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in static.layers] == pointers
    expected = generate(target, make_cache(method, draft), ids, mask, expand_size=3, **beams)
    assert torch.equal(actual.sequences, expected.sequences)
    torch.testing.assert_close(actual.sequences_scores, expected.sequences_scores, atol=1e-5, rtol=0)


def test_a_bound_model_prefills_a_static_cache_itself_and_takes_the_next_call_for_a_new_prompt(target, draft):
    bound = hs.bind(copy.deepcopy(target))
    ids, mask = random_batch(2, 30, [0, 4], seed=37)
    cache = make_cache("speckv", draft, NEW)
    first = bound.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW,
                           min_new_tokens=NEW, **GEN)
    assert cache.is_static
    assert_same(first, generate(target, make_cache("speckv", draft), ids, mask))
    other, other_mask = random_batch(1, 26, [0], seed=38)
    second = bound.generate(input_ids=other, attention_mask=other_mask, past_key_values=cache, max_new_tokens=3,
                            min_new_tokens=3, **GEN)
    assert_same(second, generate(target, make_cache("speckv", draft), other, other_mask, new_tokens=3))
    assert_matches_oracle(bound, cache, other, other_mask, second)


# ----------------------------------------------------------------------------------------------------------------------
# Fixed shapes: no reallocation, a clear error instead of growing
# ----------------------------------------------------------------------------------------------------------------------
def test_the_static_buffers_are_not_reallocated_across_decode_steps(target, draft):
    ids, mask = random_batch(2, 30, [0, 5], seed=39)
    cache = make_cache("snapkv", draft, NEW)
    cache.prepare_prefill(target, ids, {"attention_mask": mask})
    expected = [(layer.keys.data_ptr(), layer.values.data_ptr(), layer.rows_written.data_ptr())
                for layer in cache.layers]
    seen = []

    def record(module, args, kwargs):
        seen.append([(layer.keys.data_ptr(), layer.values.data_ptr(), layer.rows_written.data_ptr())
                     for layer in cache.layers])

    handle = target.register_forward_pre_hook(record, with_kwargs=True)
    try:
        target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW,
                        min_new_tokens=NEW, **GEN)
    finally:
        handle.remove()
    assert len(seen) == NEW
    assert all(step == expected for step in seen)
    assert [(layer.keys.data_ptr(), layer.values.data_ptr(), layer.rows_written.data_ptr())
            for layer in cache.layers] == expected


def test_growing_past_the_buffers_raises_instead_of_reallocating(target, draft):
    ids, mask = random_batch(1, 30, [0], seed=40)
    cache = make_cache("snapkv", draft, 3)
    cache.prepare_prefill(target, ids, {"attention_mask": mask})
    with pytest.raises(StaticCacheOverflowError, match="never reallocates"):
        target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=6,
                        min_new_tokens=6, **GEN)
    bound = hs.bind(copy.deepcopy(target))
    with pytest.raises(ValueError, match="sized for 3"):
        bound.generate(input_ids=ids, attention_mask=mask, past_key_values=make_cache("snapkv", draft, 3),
                       max_new_tokens=6, **GEN)


def test_crop_removes_only_appended_rows_in_place(target, draft):
    ids, mask = random_batch(1, 30, [0], seed=41)
    cache = make_cache("snapkv", draft, NEW)
    generate(target, cache, ids, mask, new_tokens=3)
    layer = cache.layers[0]
    pointer, seen = layer.keys.data_ptr(), layer.seen_tokens
    cache.crop(-2)
    assert layer.seen_tokens == seen - 2 and layer.keys.data_ptr() == pointer
    with pytest.raises(ValueError, match="cannot be restored"):
        cache.crop(-3)


def test_models_the_static_path_cannot_serve_are_refused_before_any_work(draft, monkeypatch):
    gemma = tiny_model("gemma3", seed=42, num_layers=2)
    ids, mask = random_batch(1, 30, [0], seed=43)
    cache = make_cache("snapkv", draft, NEW)
    with pytest.raises(ValueError, match="sliding"):
        cache.prepare_prefill(gemma, ids, {"attention_mask": mask})
    assert not cache.layers
    target = tiny_model("llama", seed=44)
    monkeypatch.setattr(type(target.base_model), "_prepare_4d_causal_attention_mask_with_cache_position",
                        lambda *args, **kwargs: None, raising=False)
    with pytest.raises(ValueError, match="own compiled-decoding mask"):
        make_cache("snapkv", draft, NEW).prepare_prefill(target, ids, {"attention_mask": mask})


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "8"])
def test_use_static_decode_validates_its_argument(value, draft):
    with pytest.raises(ValueError, match="positive integer"):
        make_cache("snapkv", draft).use_static_decode(value)


def test_the_dynamic_path_stays_the_default(target, draft):
    cache = make_cache("snapkv", draft)
    assert cache.static_decode_tokens is None
    ids, mask = random_batch(1, 30, [0], seed=45)
    cache.prepare_prefill(target, ids, {"attention_mask": mask})
    assert not cache.is_static and not cache.is_compileable
    assert cache.use_static_decode(4).use_static_decode(None).static_decode_tokens is None


# ----------------------------------------------------------------------------------------------------------------------
# The compiled call really runs
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["speckv", "snapkv"])
def test_generate_compiles_the_decode_step_once(method, draft):
    target = tiny_model("qwen2", seed=46, num_heads=4, num_kv_heads=2)
    ids, mask = random_batch(2, 30, [0, 5], seed=47)
    counter = GraphCounter()
    static = make_cache(method, draft, NEW)
    actual = generate(target, static, ids, mask, compile_config=compile_config(counter))
    assert counter.graphs == 1, "the decode forward was recompiled"
    assert counter.calls == NEW - 1, "a decode step ran eagerly"  # the last prompt token runs eagerly
    assert_same(actual, generate(target, make_cache(method, draft), ids, mask))
    assert_matches_oracle(target, static, ids, mask, actual)


@pytest.mark.slow
def test_torch_compile_of_the_bound_forward_runs_every_decode_step_in_one_graph(target, draft):
    bound = hs.bind(copy.deepcopy(target))
    counter = GraphCounter()
    bound.forward = torch.compile(bound.forward, backend=counter, fullgraph=True)
    ids, mask = random_batch(2, 30, [0, 3], seed=48)
    cache = make_cache("speckv", draft, NEW)
    actual = bound.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW,
                            min_new_tokens=NEW, **GEN)
    # The last prompt token (one shape) and the decode steps (another): two graphs, every forward compiled.
    assert counter.graphs <= 2
    assert counter.calls == NEW
    assert_same(actual, generate(target, make_cache("speckv", draft), ids, mask))
