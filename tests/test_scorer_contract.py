"""The public scorer contract (issue 12): every registered KV method and layer-wise budgets against the masked-attention
oracle, PyramidKV's budgets against hand-computed cases, Knorm against key norms computed from `k_proj`, and a
composition of public parts written here."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_specapprox as hs
from hf_specapprox.integrations import registry
from hf_specapprox.kv.policies import pyramid_budgets
from oracle import continuation_keeps_the_cache, oracle_logits
from test_oracle import assert_matches_oracle
from tiny_models import random_batch, tiny_model

KV_METHODS = [name for name, spec in registry.METHODS.items() if spec.budget == "kv"]
BUDGET, WINDOW, NEW_TOKENS = 12, 4, 3


def small_configs(spec, layer_budgets: str) -> dict:
    """A config of every class `spec` takes, sized for 30-token prompts (any registered method, no special case)."""
    configs = {}
    for argument, config_class in zip(spec.config_arguments, spec.config_classes):
        names = {field.name for field in fields(config_class)}
        knobs = {"max_capacity_prompt": BUDGET}
        if issubclass(config_class, hs.SpecPCConfig):
            knobs.update(max_capacity_prompt=24, window_size=WINDOW, starting_layer_index=0, lookahead_tokens=4)
        else:
            knobs["layer_budgets"] = layer_budgets
            if "window_size" in names:
                knobs["window_size"] = WINDOW
            if "lookahead_tokens" in names:
                knobs["lookahead_tokens"] = 4
        configs[argument] = config_class(**knobs)
    return configs


def generate(target, inputs, cache, new_tokens=NEW_TOKENS, **kwargs):
    return target.generate(
        **inputs, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs,
    )


def compressed_rows(cache) -> list[int]:
    return [layer.compressed_rows for layer in cache.layers if isinstance(layer, hs.CompressedKVLayer)]


@pytest.mark.parametrize("layer_budgets", ["uniform", "pyramid"])
@pytest.mark.parametrize("name", KV_METHODS)
@pytest.mark.parametrize("family, attn_implementation", [("llama", "sdpa"), ("qwen2", "eager")])
def test_every_registered_kv_method_equals_the_masked_oracle(name, layer_budgets, family, attn_implementation):
    target = tiny_model(family, seed=7, num_layers=4, num_heads=4, num_kv_heads=2,
                        attn_implementation=attn_implementation)
    draft = tiny_model("llama", seed=8, num_layers=2)
    hs.bind(target)
    ids, mask = random_batch(2, 30, [0, 6], seed=9)
    spec = registry.get_method(name)
    prepared = spec.build(draft if spec.uses_draft else None, **small_configs(spec, layer_budgets))(target, ids, mask)
    out = generate(target, prepared.model_inputs, prepared.cache)
    cache = prepared.cache
    assert cache.is_compressed
    rows = compressed_rows(cache)
    if layer_budgets == "uniform":
        assert len(set(rows)) == 1
    else:  # more rows in lower layers, the same total
        assert rows == sorted(rows, reverse=True) and rows[0] > rows[-1]
        assert sum(rows) == len(rows) * BUDGET
    for layer, kept in zip((layer for layer in cache.layers if isinstance(layer, hs.CompressedKVLayer)), rows):
        assert layer.keys.shape[-2] == kept + NEW_TOKENS  # + the re-fed last token + the fed new tokens but one
    assert_matches_oracle(target, cache, prepared.input_ids, prepared.attention_mask, out)


@pytest.mark.parametrize("method", ["speckv", "snapkv"])
def test_layer_wise_budgets_continue_a_filled_cache_exactly(method):
    """A continuation call feeds several tokens at once to layers of different sizes (the mask's causal part)."""
    target = tiny_model("llama", seed=11, num_layers=3, num_heads=4, num_kv_heads=2)
    draft = tiny_model("llama", seed=12, num_layers=1)
    ids, mask = random_batch(2, 32, [0, 5], seed=13)
    if method == "speckv":
        cache = hs.SpecKVCache(draft=draft, model=target, max_capacity_prompt=10, window_size=3, lookahead_tokens=3,
                               layer_budgets="pyramid", pyramid_beta=4)
    else:
        cache = hs.SnapKVCache(model=target, max_capacity_prompt=10, window_size=3, layer_budgets="pyramid")
    first = generate(target, {"input_ids": ids, "attention_mask": mask}, cache, new_tokens=2)
    assert len(set(compressed_rows(cache))) == 3
    extra = torch.randint(3, 90, (2, 4), generator=torch.Generator().manual_seed(14))
    longer = torch.cat([first.sequences, extra], dim=1)
    longer_mask = torch.cat([mask, torch.ones_like(longer[:, mask.shape[1]:])], dim=1)
    out = generate(target, {"input_ids": longer, "attention_mask": longer_mask}, cache, new_tokens=2)
    valid = torch.cat([longer_mask.bool(), torch.ones(2, 2, dtype=torch.bool)], dim=1)
    kept = {index: cache.kept_positions(index) for index in range(len(cache.layers))}
    prompt_length = ids.shape[1] if continuation_keeps_the_cache() else longer.shape[1]
    expected = oracle_logits(target, out.sequences[:, :-1], valid[:, :-1], prompt_length, kept)
    actual = torch.stack(out.logits, dim=1)
    assert (actual - expected[:, longer.shape[1] - 1:]).abs().max().item() <= 1e-4


# PyramidKV's budgets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, expected", [
    ((10, 3, 100, 5), [18, 10, 2]),       # min 10/5 = 2, max 2·10 − 2 = 18, linear
    ((10, 2, 12, 20), [12, 8]),           # max 19.5 capped at the 12 candidates, min raised to 8
    ((7, 4, 100, 20), [14, 9, 5, 0]),     # 13.65, 9.22, 4.78, 0.35: rounded as kvpress's round(), total 28 kept
    ((9, 1, 50, 20), [9]),
])
def test_pyramid_budgets_hand_computed(arguments, expected):
    assert pyramid_budgets(*arguments) == expected


@settings(max_examples=200, deadline=None)
@given(per_layer=st.integers(0, 300), num_layers=st.integers(1, 40), extra=st.integers(0, 300),
       beta=st.integers(1, 40))
def test_pyramid_budgets_keep_the_total(per_layer, num_layers, extra, beta):
    candidates = per_layer + extra
    budgets = pyramid_budgets(per_layer, num_layers, candidates, beta)
    assert sum(budgets) == per_layer * num_layers
    assert budgets == sorted(budgets, reverse=True)
    assert all(0 <= budget <= candidates for budget in budgets)


# Knorm: one file and one registry line -------------------------------------------------------------------------------


def test_knorm_keeps_the_smallest_keys_computed_from_k_proj():
    target = tiny_model("qwen2", seed=15, num_layers=2, num_heads=4, num_kv_heads=2)
    ids, mask = random_batch(2, 40, [0, 7], seed=16)
    captured = []
    hook = target.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, output: captured.append(output))
    with torch.no_grad():
        target(input_ids=ids, attention_mask=mask)
    hook.remove()
    norms = captured[0].view(2, 40, 2, -1).norm(dim=-1).transpose(1, 2)  # RoPE keeps norms; (batch, kv_heads, 40)
    cache = hs.KnormCache(max_capacity_prompt=16)
    cache.prepare_prefill(target, ids, {"attention_mask": mask})
    kept = cache.kept_positions(0)
    assert kept.shape == (2, 2, 16)
    for row in range(2):
        real = mask[row].bool()
        for head in range(2):
            chosen = torch.zeros(40, dtype=torch.bool)
            chosen[kept[row, head]] = True
            candidates = real.clone()
            candidates[-1] = False  # the last prompt token is re-computed, never a candidate
            # every kept key is at most as long as every dropped one
            assert norms[row, head][chosen].max() <= norms[row, head][candidates & ~chosen].min() + 1e-5
    assert "knorm" in registry.METHODS and registry.get_method("knorm").config_classes == (hs.KnormConfig,)


def test_a_composition_of_public_parts_equals_the_oracle():
    """Knorm's scorer, the draft's preview (unused by that scorer, still appended) and pyramid budgets, composed
    without a subclass."""

    class LastQueryScorer(hs.KVScorer):  # the attention of the newest voting row only, through the public inputs
        def score(self, inputs):
            logits = inputs.queries[:, :, -1:].float() @ inputs.candidate_keys.float().repeat_interleave(
                inputs.queries.shape[1] // inputs.keys.shape[1], dim=1).transpose(-1, -2)
            group = inputs.queries.shape[1] // inputs.keys.shape[1]
            return logits[:, :, 0].view(inputs.keys.shape[0], inputs.keys.shape[1], group, -1).amax(2)

    target = tiny_model("llama", seed=17, num_layers=3, num_heads=4, num_kv_heads=2)
    draft = tiny_model("llama", seed=18, num_layers=1)
    ids, mask = random_batch(2, 30, [0, 4], seed=19)
    config = hs.SpecKVConfig(max_capacity_prompt=10, window_size=2, lookahead_tokens=3, layer_budgets="pyramid")
    for scorer in (hs.KeyNormScorer(), LastQueryScorer()):
        cache = hs.KVCompressionCache(config, model=target, scorer=scorer, query_source=hs.DraftPreview(draft))
        out = generate(target, {"input_ids": ids, "attention_mask": mask}, cache)
        assert cache.lookahead_ids.shape[1] > 0
        assert_matches_oracle(target, cache, ids, mask, out)


# Refusals, before any work -------------------------------------------------------------------------------------------


class _CountingDraft:
    def __init__(self, draft):
        self.calls = 0
        draft.register_forward_pre_hook(lambda *args: setattr(self, "calls", self.calls + 1))


def test_layer_wise_budgets_refuse_an_unbound_model_and_static_decoding_before_any_work():
    target = tiny_model("llama", seed=20, num_layers=2)
    draft = tiny_model("llama", seed=21, num_layers=1)
    counter = _CountingDraft(draft)
    ids, mask = random_batch(1, 30, [0], seed=22)
    cache = hs.SpecKVCache(draft=draft, max_capacity_prompt=10, window_size=2, layer_budgets="pyramid")
    with pytest.raises(ValueError, match=r"needs a bound target.*hf_specapprox.bind\(model\)"):
        cache.prepare_prefill(target, ids, {"attention_mask": mask})
    hs.bind(target)
    cache.use_static_decode(4)
    with pytest.raises(ValueError, match=r"static decoding.*use_static_decode\(None\)"):
        cache.prepare_prefill(target, ids, {"attention_mask": mask})
    assert counter.calls == 0 and not cache.layers
    hs.unbind(target)


def test_a_scorer_of_the_wrong_shape_is_refused_with_the_expected_shape():
    class Flat(hs.KVScorer):
        def score(self, inputs):
            return inputs.candidate_keys.float().norm(dim=-1).mean(1)  # (batch, candidates): heads lost

    target = tiny_model("llama", seed=23, num_layers=2)
    ids, mask = random_batch(1, 20, [0], seed=24)
    cache = hs.KVCompressionCache(hs.KVSelectionConfig(max_capacity_prompt=8), scorer=Flat())
    with pytest.raises(ValueError, match=r"one score per \(batch row, KV head, candidate\)"):
        cache.prepare_prefill(target, ids, {"attention_mask": mask})
    assert not cache.layers
    with pytest.raises(ValueError, match="has no scorer"):
        hs.KVCompressionCache(max_capacity_prompt=8).prepare_prefill(target, ids, {"attention_mask": mask})


def test_knorm_and_layer_wise_budgets_through_the_pipeline_per_call():
    from transformers import pipeline

    from tiny_models import tiny_tokenizer, words

    target = tiny_model("qwen2", seed=25, num_layers=3, num_heads=4, num_kv_heads=2)
    pipe = pipeline("speckv-text-generation", model=target, tokenizer=tiny_tokenizer(), method="snapkv",
                    snapkv_config=hs.SnapKVConfig(max_capacity_prompt=12, window_size=3))
    prompt = words(40, 26)
    uniform = pipe(prompt, max_new_tokens=2, do_sample=False, method="knorm",
                   knorm_config=hs.KnormConfig(max_capacity_prompt=12))[0]["hf_specapprox"]
    pyramid = pipe(prompt, max_new_tokens=2, do_sample=False, method="knorm",
                   knorm_config=hs.KnormConfig(max_capacity_prompt=12, layer_budgets="pyramid"))[0]["hf_specapprox"]
    assert uniform["kv_kept_per_layer"] == pyramid["kv_kept_per_layer"] == 12  # the average over layers
