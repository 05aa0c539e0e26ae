"""The scoring reference against the materialised formula, and the selection helpers' invariants."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_specapprox.modeling.draft import generate_lookahead
from hf_specapprox.kernels import pool_scores, select_kept_positions, window_scores


def materialised_scores(q, k, scaling, query_offset, key_valid, query_valid, reduction):
    """The whole `(B, H, W, N)` probability tensor, then the reduction: the formula in its plainest form."""
    batch, heads, window, _ = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    group = heads // kv_heads
    k_rep = k.repeat_interleave(group, dim=1)
    logits = torch.einsum("bhwd,bhnd->bhwn", q.double(), k_rep.double()) * scaling
    visible = torch.arange(n)[None, :] <= (query_offset + torch.arange(window))[:, None]
    visible = visible[None, None] & key_valid[:, None, None, :]
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num(0.0)
    row_ok = query_valid[:, None, :, None] & visible.any(-1, keepdim=True)
    probs = probs * row_ok
    probs = probs.reshape(batch, kv_heads, group * window, n)
    if reduction == "max":
        return probs.amax(2).float()
    counts = row_ok.expand(batch, heads, window, 1).reshape(batch, kv_heads, group * window).sum(-1, keepdim=True)
    return (probs.sum(2) / counts.clamp(min=1)).float()


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    n=st.integers(1, 70),
    window=st.integers(1, 12),
    chunk=st.integers(1, 33),
    reduction=st.sampled_from(["max", "mean"]),
    seed=st.integers(0, 10_000),
)
def test_chunked_reference_equals_materialised_formula(batch, kv_heads, group, n, window, chunk, reduction, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, window, 8, generator=generator)
    k = torch.randn(batch, kv_heads, n, 8, generator=generator)
    query_offset = n - window  # may be negative: window longer than the sequence
    key_valid = torch.rand(batch, n, generator=generator) > 0.2
    query_valid = torch.rand(batch, window, generator=generator) > 0.2
    kwargs = dict(scaling=0.35, query_offset=query_offset, key_valid=key_valid, query_valid=query_valid,
                  reduction=reduction)
    actual = window_scores(q, k, chunk_size=chunk, **kwargs)
    expected = materialised_scores(q, k, **kwargs)
    assert not torch.isnan(actual).any()
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)


def test_fully_masked_rows_give_zero_not_nan():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 5, 4)
    scores = window_scores(q, k, scaling=0.5, query_offset=2, key_valid=torch.zeros(1, 5, dtype=torch.bool))
    assert torch.equal(scores, torch.zeros(1, 1, 5))


def test_half_precision_inputs_accumulate_in_fp32():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 5, 16, generator=generator), torch.randn(1, 2, 40, 16, generator=generator)
    full = window_scores(q, k, scaling=0.25, query_offset=35)
    half = window_scores(q.bfloat16(), k.bfloat16(), scaling=0.25, query_offset=35)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=2e-2, rtol=0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), kernel=st.sampled_from([1, 3, 5, 7]), seed=st.integers(0, 1000))
def test_max_pool_is_the_windowed_max(n, kernel, seed):
    x = torch.rand(2, 3, n, generator=torch.Generator().manual_seed(seed))
    pooled = pool_scores(x, kernel, "max")
    half = kernel // 2
    for j in range(n):
        assert torch.equal(pooled[..., j], x[..., max(0, j - half) : j + half + 1].amax(-1))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 40), select=st.integers(1, 40), window=st.integers(0, 5), seed=st.integers(0, 1000),
    pad=st.integers(0, 40),
)
def test_kept_positions_invariants(n, select, window, seed, pad):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, 3, n, generator=generator)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, : min(pad, n)] = False
    window_positions = torch.arange(n, n + window)
    kept = select_kept_positions(scores, valid, select, window_positions)
    count = min(select, n)
    assert kept.shape == (2, 3, count + window)
    assert (kept.diff(dim=-1) > 0).all()  # strictly increasing, hence unique
    assert torch.equal(kept[..., count:], window_positions.expand(2, 3, -1))
    real = valid[1].sum().item()
    chosen_real = valid[1][kept[1, :, :count]].sum(-1)
    assert (chosen_real == min(real, count)).all()  # real tokens always win over padding
    # Among real candidates, the chosen ones are the best-scored.
    for head in range(3):
        chosen = kept[0, head, :count]
        assert scores[0, head, chosen].min() >= scores[0, head].topk(count).values.min()


def test_lookahead_is_plain_greedy_cut_after_eos_and_runs_once_per_distinct_row():
    from tiny_models import random_batch, tiny_model

    draft = tiny_model("llama", seed=5, num_layers=1)
    draft.generation_config.eos_token_id = list(range(2, 30))  # frequent EOS
    ids, mask = random_batch(2, 12, [0, 3], seed=2)
    expected = draft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[:, 12:]
    batch_sizes = []
    draft.register_forward_pre_hook(lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    tokens, valid = generate_lookahead(draft, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), 6)
    assert set(batch_sizes) == {2}  # four rows, two distinct prompts
    is_eos = torch.isin(expected, torch.arange(2, 30))
    expected_valid = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
    width = tokens.shape[1]  # decoding stops once every row has ended
    assert torch.equal(valid, expected_valid.repeat_interleave(2, 0)[:, :width])
    assert torch.equal(tokens[valid], expected.repeat_interleave(2, 0)[:, :width][valid])
    assert not expected_valid[:, width:].any()
