"""SpecPrefill-style chunks, recency and random controls."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_specapprox as hs
from hf_specapprox.kernels.select import chunk_keep_mask
from tiny_models import random_batch, tiny_model


def chunk_reference(scores, budget, chunk):
    """Plain loops: chunks from the start, ranked by mean score (ties: earlier first), taken whole, cut to budget."""
    length = len(scores)
    chunks = [list(range(start, min(start + chunk, length))) for start in range(0, length, chunk)]
    means = [sum(scores[i] for i in c) / len(c) for c in chunks]
    order = sorted(range(len(chunks)), key=lambda c: (-means[c], c))
    taken = [i for c in order for i in chunks[c]][: min(budget, length)]
    return sorted(taken)


@settings(max_examples=80, deadline=None)
@given(length=st.integers(1, 70), budget=st.integers(1, 80), chunk=st.integers(1, 9), pad=st.integers(0, 5),
       seed=st.integers(0, 10_000))
def test_chunk_selection_equals_reference(length, budget, chunk, pad, seed):
    scores = torch.rand(length, generator=torch.Generator().manual_seed(seed))
    padded = torch.cat([torch.zeros(pad), scores])[None]
    valid = (torch.arange(pad + length) >= pad)[None]
    mask = chunk_keep_mask(padded, valid, max_capacity_prompt=budget, chunk_size=chunk)
    assert (torch.nonzero(mask[0]).flatten() - pad).tolist() == chunk_reference(scores.tolist(), budget, chunk)


@torch.no_grad()
def test_specprefill_last_token_variant_scores_are_the_last_tokens_attention():
    # SpecPrefill's `look_ahead_cnt=1` variant without pooling (its defaults: tests/test_faithful_defaults.py)
    draft = tiny_model("llama", seed=3, num_layers=2, attn_implementation="eager")
    ids, mask = random_batch(2, 30, [0, 5], seed=4)
    out = hs.SpecPrefillPreprocessor(draft, max_capacity_prompt=12, chunk_size=4, lookahead_tokens=1,
                                     pool_kernel_size=1, keep_original_positions=False)(ids, mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    attentions = draft(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True).attentions
    expected = torch.stack([a[:, :, -1, :] for a in attentions]).amax(dim=(0, 2)).masked_fill(~mask.bool(), 0)
    torch.testing.assert_close(out.token_scores, expected, atol=1e-6, rtol=1e-5)
    assert out.kept_lengths.tolist() == [12, 12]


def test_recency_keeps_the_tail_and_random_is_seeded():
    ids, mask = random_batch(2, 30, [0, 8], seed=5)
    recent = hs.RecencyPreprocessor(max_capacity_prompt=10)(ids, mask)
    assert recent.kept_indices[0].tolist() == list(range(20, 30))
    assert recent.kept_indices[1].tolist() == list(range(12, 22))
    first = hs.RandomPreprocessor(max_capacity_prompt=10, window_size=3, seed=1)(ids, mask)
    again = hs.RandomPreprocessor(max_capacity_prompt=10, window_size=3, seed=1)(ids, mask)
    assert all(torch.equal(a, b) for a, b in zip(first.kept_indices, again.kept_indices))
    assert {27, 28, 29} <= set(first.kept_indices[0].tolist()) and first.kept_lengths.tolist() == [10, 10]
