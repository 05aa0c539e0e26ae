"""SpecPC: selection against an independent reading of the paper, its invariants, the draft's votes, end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_specapprox as hs
from hf_specapprox.kernels.select import specpc_keep_mask
from tiny_models import random_batch, tiny_model


def paper_selection(scores, budget, window, kernel, neighbours):
    """paper.md §3.1 steps 3-6 for one unpadded row, written as plainly as the paper's code (lists, first-occurrence
    de-duplication)."""
    length = len(scores)
    left = (kernel - 1) // 2
    padded = F.pad(torch.as_tensor(scores, dtype=torch.float32)[None, None], (left, kernel - 1 - left))
    pooled = F.max_pool1d(padded, kernel, 1)[0, 0].tolist()
    ranked = sorted(range(length), key=lambda i: -pooled[i])[:budget] if budget < length else list(range(length))
    first = -((neighbours - 1) // 2)
    offsets = sorted(range(first, first + neighbours), key=abs)
    expanded = [min(max(r + o, 0), length - 1) for r in ranked for o in offsets]
    ordered = list(dict.fromkeys(list(range(length - window, length)) + list(dict.fromkeys(expanded))))
    return sorted(ordered[:budget])


def kept(mask_row, first_real=0):
    return (torch.nonzero(mask_row).flatten() - first_real).tolist()


@settings(max_examples=80, deadline=None)
@given(
    length=st.integers(2, 80), budget=st.integers(1, 90), window=st.integers(1, 10),
    neighbours=st.integers(1, 9), seed=st.integers(0, 10_000),
)
def test_selection_equals_the_papers_rule(length, budget, window, neighbours, seed):
    window = min(window, length)
    budget = max(budget, window)  # the paper's regime; with a window over the budget it would cut the window itself
    scores = torch.rand(length, generator=torch.Generator().manual_seed(seed))  # distinct: no ranking ties
    mask = specpc_keep_mask(scores[None], torch.ones(1, length, dtype=torch.bool), max_capacity_prompt=budget,
                            window_size=window, kernel_size=1, neighbor_tokens=neighbours)
    assert kept(mask[0]) == paper_selection(scores.tolist(), budget, window, 1, neighbours)


batches = st.fixed_dictionaries({
    "rows": st.integers(1, 4), "length": st.integers(4, 60), "budget": st.integers(1, 70), "window": st.integers(1, 12),
    "kernel": st.integers(1, 9), "neighbours": st.integers(1, 9), "seed": st.integers(0, 10_000),
    "pool": st.sampled_from(["max", "mean"]),
})


def draw_batch(params, data):
    generator = torch.Generator().manual_seed(params["seed"])
    length = params["length"]
    scores = torch.rand(params["rows"], length, generator=generator)
    pads = [data.draw(st.integers(0, length - 1)) for _ in range(params["rows"])]
    valid = torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]
    protected = (torch.rand(params["rows"], length, generator=generator) < 0.05) & valid
    return scores, valid, protected


def select(scores, valid, params, protected=None):
    return specpc_keep_mask(scores, valid, max_capacity_prompt=params["budget"], window_size=params["window"],
                            kernel_size=params["kernel"], neighbor_tokens=params["neighbours"],
                            pool_type=params["pool"], protected=protected)


@settings(max_examples=80, deadline=None)
@given(params=batches, data=st.data())
def test_selection_invariants(params, data):
    scores, valid, protected = draw_batch(params, data)
    mask = select(scores, valid, params, protected)
    for row in range(scores.shape[0]):
        real = int(valid[row].sum())
        first = scores.shape[1] - real
        positions = kept(mask[row])
        assert all(valid[row, p] for p in positions)  # in range: never padding
        window = set(range(scores.shape[1] - min(params["window"], real), scores.shape[1]))
        always = window | set(torch.nonzero(protected[row]).flatten().tolist())
        assert always <= set(positions)  # tail window and protected tokens always kept
        assert len(positions) == max(min(params["budget"], real), len(always))
        if params["budget"] >= real:
            assert positions == list(range(first, scores.shape[1]))  # identity
        # the row alone, unpadded, gives the same selection
        alone = select(scores[row : row + 1, first:], valid[row : row + 1, first:], params, protected[row : row + 1, first:])
        assert kept(alone[0]) == kept(mask[row], first)


@settings(max_examples=40, deadline=None)
@given(params=batches, extra=st.integers(1, 7), data=st.data())
def test_selection_is_invariant_to_extra_left_padding(params, extra, data):
    scores, valid, protected = draw_batch(params, data)
    mask = select(scores, valid, params, protected)
    pad = lambda t, value: torch.cat([torch.full((t.shape[0], extra), value, dtype=t.dtype), t], dim=1)
    padded = select(pad(scores, 0.9), pad(valid, False), params, pad(protected, False))
    assert torch.equal(padded[:, extra:], mask) and not padded[:, :extra].any()


@torch.no_grad()
def test_draft_votes_equal_eager_attention_of_the_draft():
    """token_scores = max over layers >= l_skip, heads and window queries of weight_q * A[q, j] (lookahead 1)."""
    draft = tiny_model("qwen2", seed=7, num_layers=3, num_heads=4, num_kv_heads=2, attn_implementation="eager")
    ids, mask = random_batch(2, 40, [0, 9], seed=8)
    window = 6
    specpc = hs.SpecPCPreprocessor(draft, max_capacity_prompt=20, window_size=window, kernel_size=5,
                                   starting_layer_index=1)
    out = specpc(ids, mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    attentions = draft(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True).attentions
    weights = torch.linspace(0, 1, window)[None, None, :, None]
    expected = torch.stack([a[:, :, -window:, :] * weights for a in attentions[1:]]).amax(dim=(0, 2, 3))
    expected = expected.masked_fill(~mask.bool(), 0.0)
    torch.testing.assert_close(out.token_scores, expected, atol=1e-6, rtol=1e-5)


def test_specpc_then_generate_equals_generate_on_the_gathered_ids():
    target = tiny_model("llama", seed=9, num_heads=4, num_kv_heads=2)
    draft = tiny_model("llama", seed=10, num_layers=2)
    ids, mask = random_batch(3, 50, [0, 7, 20], seed=11)
    specpc = hs.SpecPCPreprocessor(draft, max_capacity_prompt=18, window_size=4, kernel_size=3,
                                   starting_layer_index=1, lookahead_tokens=2)
    out = specpc(ids, mask)
    batched = target.generate(**out.model_inputs, max_new_tokens=4, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
    for row in range(3):
        real = ids[row][mask[row].bool()]
        gathered = real[out.kept_indices[row]][None]
        assert torch.equal(gathered[0], out.input_ids[row][out.attention_mask[row].bool()])
        alone = target.generate(input_ids=gathered, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                output_logits=True, return_dict_in_generate=True)
        assert torch.equal(alone.sequences[0, gathered.shape[1] :], batched.sequences[row, out.input_ids.shape[1] :])
        torch.testing.assert_close(torch.stack(alone.logits)[:, 0], torch.stack(batched.logits)[:, row], atol=1e-4,
                                   rtol=0)
    assert out.stats["kept_tokens"] == [18, 18, 18] and out.stats["original_tokens"] == [50, 43, 30]


def test_protected_ids_sinks_and_spans_are_kept():
    draft = tiny_model("llama", seed=12, num_layers=2)
    ids, mask = random_batch(2, 40, [0, 5], seed=13)
    ids[:, 10] = 7  # a "special token" in both rows
    span = torch.zeros_like(ids, dtype=torch.bool)
    span[0, 20:24] = True
    specpc = hs.SpecPCPreprocessor(draft, max_capacity_prompt=12, window_size=3, kernel_size=1,
                                   starting_layer_index=0, num_sink_tokens=2, protected_token_ids=[7])
    out = specpc(ids, mask, protected_mask=span)
    assert {0, 1, 10, 20, 21, 22, 23, 37, 38, 39} <= set(out.kept_indices[0].tolist())
    assert {0, 1, 5, 32, 33, 34} <= set(out.kept_indices[1].tolist())  # row 1: padded by 5, so id 7 sits at 5


def test_all_protected_prompt_is_kept_whole():
    draft = tiny_model("llama", seed=14, num_layers=2)
    ids, mask = random_batch(1, 20, [0], seed=15)
    specpc = hs.SpecPCPreprocessor(draft, max_capacity_prompt=5, window_size=2, starting_layer_index=0)
    out = specpc(ids, mask, protected_mask=torch.ones_like(ids, dtype=torch.bool))
    assert out.kept_indices[0].tolist() == list(range(20)) and torch.equal(out.input_ids, ids)


def test_window_longer_than_prompt_is_handled():
    draft = tiny_model("llama", seed=16, num_layers=2)
    ids, mask = random_batch(2, 10, [0, 6], seed=17)
    out = hs.SpecPCPreprocessor(draft, max_capacity_prompt=12, window_size=12, starting_layer_index=0)(ids, mask)
    assert out.kept_lengths.tolist() == [10, 4]  # the window covers every row: all is window


def test_bad_inputs():
    draft = tiny_model("llama", seed=18, num_layers=2)
    with pytest.raises(ValueError, match=">= 1"):
        hs.SpecPCConfig(max_capacity_prompt=0)
    with pytest.raises(ValueError, match="number of layers"):
        hs.SpecPCPreprocessor(draft)  # starting_layer_index 8 on a 2-layer draft
    ids, mask = random_batch(2, 10, [0, 0])
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match="left padding"):
        hs.SpecPCPreprocessor(draft, starting_layer_index=0)(ids, mask)
