"""Bad inputs fail early with an error that says what to do; failures leave the model exactly as it was."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DynamicCache

import hf_specapprox as hs
from hf_specapprox import compat
from hf_specapprox import kernels as scoring
from test_oracle import assert_matches_oracle
from tiny_models import random_batch, tiny_model


@pytest.fixture
def pair():
    return tiny_model("llama", seed=21), tiny_model("llama", seed=22, num_layers=1)


def generate(target, cache, ids, mask=None, **kwargs):
    return target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3,
                           do_sample=False, pad_token_id=0, **kwargs)


def test_budget_not_above_window():
    with pytest.raises(ValueError, match="must be larger than `window_size`"):
        hs.SpecKVConfig(max_capacity_prompt=32, window_size=32)


def test_even_pool_kernel():
    with pytest.raises(ValueError, match="must be odd"):
        hs.SpecKVConfig(kernel_size=6)


@pytest.mark.parametrize(
    "knobs, error",
    [
        ({"max_capacity_prompt": 0}, ValueError),
        ({"max_capacity_prompt": 64.0}, TypeError),
        ({"lookahead_tokens": -1}, ValueError),
        ({"pool_type": "sum"}, ValueError),
        ({"reduction_type": "median"}, ValueError),
    ],
)
def test_invalid_knobs(knobs, error):
    with pytest.raises(error):
        hs.SpecKVConfig(**knobs)


def test_config_and_knobs_together(pair):
    _, draft = pair
    with pytest.raises(ValueError, match="not both"):
        hs.SpecKVCache(draft=draft, config=hs.SpecKVConfig(), window_size=4)


def test_vocab_mismatch(pair):
    target, _ = pair
    big_vocab_draft = tiny_model("llama", seed=3, num_layers=1, vocab_size=4000)
    ids, _ = random_batch(1, 30, [0])
    cache = hs.SpecKVCache(draft=big_vocab_draft, model=target, max_capacity_prompt=12, window_size=3)
    with pytest.raises(ValueError, match="same tokenizer"):
        generate(target, cache, ids)


def test_inputs_embeds_without_ids(pair):
    target, draft = pair
    hs.bind(target)
    ids, _ = random_batch(1, 30, [0])
    embeds = target.get_input_embeddings()(ids)
    cache = hs.SpecKVCache(draft=draft, max_capacity_prompt=12, window_size=3)
    with pytest.raises(ValueError, match="input_ids"):
        target.generate(inputs_embeds=embeds, past_key_values=cache, max_new_tokens=2, pad_token_id=0)


def test_right_padding(pair):
    target, draft = pair
    ids, mask = random_batch(2, 30, [0, 0])
    mask[1, -4:] = 0
    cache = hs.SpecKVCache(draft=draft, model=target, max_capacity_prompt=12, window_size=3)
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        generate(target, cache, ids, mask)
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        cache.prepare_prefill(target, ids, {"attention_mask": mask})
    if compat.has_native_prepare_prefill():  # no forward hook there: a forward of one's own needs the explicit step
        with pytest.raises(hs.UnboundCacheError, match="prepare_prefill"):
            target(input_ids=ids, attention_mask=mask, past_key_values=cache)
    else:  # the binding's forward pre-hook takes a fresh cache's first forward for the prompt
        with pytest.raises(ValueError, match="padding_side = 'left'"):
            target(input_ids=ids, attention_mask=mask, past_key_values=cache)


def test_unbound_cache(pair):
    target, draft = pair
    hs.unbind(target)
    ids, _ = random_batch(1, 30, [0])
    cache = hs.SpecKVCache(draft=draft, max_capacity_prompt=12, window_size=3)
    if not compat.has_native_prepare_prefill():
        with pytest.raises(hs.UnboundCacheError, match=r"hf_specapprox.bind\(model\)"):
            generate(target, cache, ids)
        return
    # transformers' own generate hands the cache its prompt: an unbound model is served, exactly as a bound one.
    out = target.generate(input_ids=ids, past_key_values=cache, max_new_tokens=3, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, output_logits=True)
    assert cache.is_compressed
    assert_matches_oracle(target, cache, ids, torch.ones_like(ids), out)
    with pytest.raises(hs.UnboundCacheError, match="prepare_prefill"):  # a forward outside generate: fill it first
        target(input_ids=ids, past_key_values=hs.SpecKVCache(draft=draft, max_capacity_prompt=12, window_size=3))


def test_linear_attention_model_is_refused(pair):
    if not hasattr(transformers, "Qwen3NextConfig"):
        pytest.skip("this transformers version has no linear-attention model")
    config = transformers.Qwen3NextConfig(
        num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=97,
        linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        intermediate_size=64, moe_intermediate_size=16, num_experts=2, num_experts_per_tok=1,
        shared_expert_intermediate_size=16,
    )
    with pytest.raises(ValueError, match="linear_attention"):
        hs.kv.layers.build_layers(config)


def test_all_sliding_model_is_refused(pair):
    _, draft = pair
    target = tiny_model("mistral", seed=1)
    target.config.sliding_window = 8
    cache = hs.SpecKVCache(draft=draft, model=target, max_capacity_prompt=12, window_size=3)
    ids, _ = random_batch(1, 30, [0])
    with pytest.raises(ValueError, match="no full-attention layer"):
        generate(target, cache, ids)


def _model_state(model):
    configs = [model.config, model.base_model.config]
    return (
        [c._attn_implementation for c in configs],
        dict(model._forward_pre_hooks),
        [dict(m._forward_hooks) for m in model.modules()],
        [dict(m._forward_pre_hooks) for m in model.modules()],
    )


def _assert_model_untouched_and_working(target, before, reference):
    assert _model_state(target) == before
    ids, mask = random_batch(2, 30, [0, 5], seed=99)
    plain = target.generate(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), max_new_tokens=4,
                            do_sample=False, pad_token_id=0)
    expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                  pad_token_id=0)
    assert torch.equal(plain, expected)


def test_exception_in_draft_leaves_model_as_it_was():
    target, reference = tiny_model("llama", seed=31), tiny_model("llama", seed=31)
    hs.bind(target)
    before = _model_state(target)

    draft = tiny_model("llama", seed=36, num_layers=1)

    def explode(module, args, kwargs):
        raise RuntimeError("draft exploded")

    draft.register_forward_pre_hook(explode, with_kwargs=True)
    cache = hs.SpecKVCache(draft=draft, max_capacity_prompt=12, window_size=3)
    ids, _ = random_batch(1, 30, [0])
    with pytest.raises(RuntimeError, match="draft exploded"):
        generate(target, cache, ids)
    assert cache.get_seq_length() == 0 and not cache.layers
    _assert_model_untouched_and_working(target, before, reference)


def test_exception_in_scorer_leaves_model_as_it_was(monkeypatch):
    target, reference = tiny_model("gemma3", seed=32), tiny_model("gemma3", seed=32)
    draft = tiny_model("llama", seed=33, num_layers=1)
    hs.bind(target)
    before = _model_state(target)
    calls = []

    def failing_scores(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("scorer exploded")

    monkeypatch.setattr(scoring, "window_scores", failing_scores)
    cache = hs.SpecKVCache(draft=draft, max_capacity_prompt=12, window_size=3)
    ids, _ = random_batch(1, 30, [0])
    with pytest.raises(RuntimeError, match="scorer exploded"):
        generate(target, cache, ids)
    assert calls and cache.get_seq_length() == 0
    monkeypatch.undo()
    _assert_model_untouched_and_working(target, before, reference)


def test_bind_is_idempotent_and_unbind_restores_hooks():
    target = tiny_model("llama", seed=34)
    hooks_before = dict(target._forward_pre_hooks)
    hs.bind(target)
    hs.bind(target)
    hooks_added = 0 if compat.has_native_prepare_prefill() else 1  # generate calls `prepare_prefill` itself there
    assert hs.is_bound(target) and len(target._forward_pre_hooks) == len(hooks_before) + hooks_added
    hs.unbind(target)
    assert not hs.is_bound(target) and dict(target._forward_pre_hooks) == hooks_before
    assert not target._forward_pre_hooks_with_kwargs


def test_bound_model_without_our_cache_is_unchanged():
    target, reference = tiny_model("qwen3", seed=35), tiny_model("qwen3", seed=35)
    hs.bind(target)
    ids, mask = random_batch(2, 20, [0, 3], seed=1)
    a = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    b = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
