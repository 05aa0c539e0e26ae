"""SpecKV / SnapKV / StreamingLLM inside stock `generate` equal the masked-attention oracle (DESIGN.md §3)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_specapprox as hs
from oracle import oracle_logits
from tiny_models import FAMILIES, random_batch, tiny_model

TOLERANCE = 1e-4


def assert_matches_oracle(target, cache, ids, mask, out):
    prompt_length = ids.shape[1]
    sequences = out.sequences
    generated = sequences.shape[1] - prompt_length
    valid = torch.cat([mask.bool(), torch.ones(ids.shape[0], generated, dtype=torch.bool, device=mask.device)], dim=1)
    kept = {}
    for layer_idx in range(len(cache.layers)):
        positions = cache.kept_positions(layer_idx)
        if positions is not None:
            kept[layer_idx] = positions
    assert kept, "nothing was compressed"
    expected = oracle_logits(target, sequences[:, :-1], valid[:, :-1], prompt_length, kept)
    actual = torch.stack(out.logits, dim=1).cpu()  # (B, generated, V)
    reference = expected[:, prompt_length - 1 :].cpu()
    assert actual.shape == reference.shape
    diff = (actual - reference).abs().max().item()
    assert diff <= TOLERANCE, f"max abs diff {diff}"


model_shapes = st.fixed_dictionaries(
    {
        "family": st.sampled_from(FAMILIES),
        "attn_implementation": st.sampled_from(["sdpa", "eager"]),
        "num_kv_heads": st.sampled_from([1, 2]),
        "group": st.sampled_from([1, 2, 4]),
        "num_layers": st.integers(2, 3),
    }
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=model_shapes,
    batch=st.integers(1, 3),
    prompt_length=st.integers(24, 48),
    window=st.integers(1, 6),
    extra_budget=st.integers(1, 12),
    lookahead=st.integers(0, 6),
    new_tokens=st.integers(1, 4),
    data=st.data(),
)
def test_speckv_generate_equals_masked_oracle(shape, batch, prompt_length, window, extra_budget, lookahead, new_tokens, data):
    paddings = [data.draw(st.integers(0, prompt_length - 4)) for _ in range(batch)]
    paddings[0] = 0 if batch == 1 else paddings[0]
    target = tiny_model(
        shape["family"],
        seed=1,
        num_layers=shape["num_layers"],
        num_kv_heads=shape["num_kv_heads"],
        num_heads=shape["num_kv_heads"] * shape["group"],
        attn_implementation=shape["attn_implementation"],
    )
    draft = tiny_model("llama", seed=2, num_layers=1)
    draft.generation_config.eos_token_id = list(range(2, 20))  # the draft often stops early
    ids, mask = random_batch(batch, prompt_length, paddings, seed=3)
    budget = min(window + extra_budget, prompt_length - 2)
    cache = hs.SpecKVCache(
        draft=draft, model=target, max_capacity_prompt=budget, window_size=window, lookahead_tokens=lookahead
    )
    out = target.generate(
        input_ids=ids,
        attention_mask=mask,
        past_key_values=cache,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    assert cache.is_compressed
    full_layers = [layer for layer in cache.layers if isinstance(layer, hs.CompressedKVLayer)]
    for layer in full_layers:
        assert layer.keys.shape[-2] == budget + new_tokens  # budget + re-fed last token + (new_tokens - 1) fed tokens
        assert layer.get_seq_length() == prompt_length + new_tokens - 1
    assert_matches_oracle(target, cache, ids, mask, out)


@settings(max_examples=10, deadline=None)
@given(
    family=st.sampled_from(FAMILIES),
    method=st.sampled_from(["snapkv", "streaming"]),
    batch=st.integers(1, 2),
    pad=st.integers(0, 10),
)
def test_baselines_equal_masked_oracle(family, method, batch, pad):
    target = tiny_model(family, seed=4)
    ids, mask = random_batch(batch, 30, [0] + [pad] * (batch - 1), seed=5)
    if method == "snapkv":
        cache = hs.SnapKVCache(model=target, max_capacity_prompt=12, window_size=4)
    else:
        cache = hs.StreamingLLMCache(model=target, max_capacity_prompt=12, num_sink_tokens=3)
    out = target.generate(
        input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3, min_new_tokens=3,
        do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    assert_matches_oracle(target, cache, ids, mask, out)
