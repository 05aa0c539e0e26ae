"""The vertical-slash sparse attention against an independent oracle: dense fp32 attention under a boolean mask built
here by broadcasting over positions from the rule MInference's `vertical_slash_sparse_attention` implements as the
paper's SpecKV prefill calls it (`csrc/vertical_slash_index.cu`: a query block starting at `s` has the end
`e = s + block_size`, also for a ragged final block, and sees the band `[e - window - block, e)`, causal, plus the
vertical columns below it).

Small windows, blocks and FlexAttention tiles make sequences of a few dozen tokens cross the band, the columns, several
tiles and ragged final blocks. Shapes are kept to a few combinations because every new one compiles a kernel.
"""

from __future__ import annotations

import builtins

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_specapprox.kernels import sparse_attention
from hf_specapprox.kernels.sparse_attention import vertical_columns, vertical_slash_attention

TILE = 16  # FlexAttention tile used by the tests: 80 tokens give five query tiles


def oracle_mask(length, columns, key_valid, window, block, sparse_rows=None):
    """`(batch, num_kv_heads, n, n)` bool: query `i` sees key `j`. A row's blocks start at its first valid position
    (as they would with the row alone); a row that `sparse_rows` marks False sees every earlier key."""
    first = [next((p for p in range(length) if key_valid[row, p]), 0) for row in range(key_valid.shape[0])]
    origin = torch.tensor(first)[:, None, None]
    i = torch.arange(length)[None, :, None]
    j = torch.arange(length)[None, None, :]
    band = (j <= i) & (j >= origin + (i - origin) // block * block - window)
    if sparse_rows is not None:
        band |= ~sparse_rows[:, None, None] & (j <= i)
    is_column = torch.zeros(*columns.shape[:2], length, dtype=torch.bool)
    is_column.scatter_(-1, columns, True)
    visible = band[:, None] | (is_column[:, :, None, :] & (j <= i)[:, None])
    return visible & key_valid[:, None, None, :]


def oracle(query, key, value, mask, scaling):
    """Dense fp32 attention under `mask` (per KV head), in the `(batch, n, heads, head_dim)` layout; zeros for rows
    that see nothing."""
    group = query.shape[1] // key.shape[1]
    mask = mask.repeat_interleave(group, dim=1)
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    logits = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, v).transpose(1, 2)


def random_inputs(seed, batch, heads, kv_heads, length, head_dim=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, length, head_dim, generator=gen).to(dtype)
    key = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(dtype)
    value = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(dtype)
    return query, key, value, gen


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    length=st.integers(1, 80),
    band=st.sampled_from([(8, 4), (16, 8), (12, 6), (32, 4), (40, 8), (0, 4)]),
    seed=st.integers(0, 2**16),
)
def test_matches_masked_oracle(data, length, band, seed):
    """Per row and KV head vertical sets (repeats and padding positions included), GQA, left padding (blocks aligned
    per row), batch 2, dense rows beside sparse ones, ragged blocks and tiles; rows that see nothing (all padding)
    give zeros."""
    window, block = band
    query, key, value, gen = random_inputs(seed, 2, 4, 2, length)
    pads = [data.draw(st.integers(0, length), label=f"pad{row}") for row in range(2)]
    key_valid = torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]
    sparse_rows = torch.tensor([True, data.draw(st.booleans(), label="second row sparse")])
    count = data.draw(st.integers(0, 2 * length), label="count")
    columns = torch.randint(0, length, (2, 2, count), generator=gen)  # unsorted, with repeats, some in padding
    output = vertical_slash_attention(
        query, key, value, columns, scaling=0.25, key_valid=key_valid, sparse_rows=sparse_rows, window_size=window,
        block_size=block, flex_block_size=TILE,
    )
    mask = oracle_mask(length, columns, key_valid, window, block, sparse_rows)
    expected = oracle(query, key, value, mask, 0.25)
    assert output.shape == (2, length, 4, 16) and output.dtype == torch.float32
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, expected, atol=2e-5, rtol=2e-5)


def test_sparsity_changes_the_output_and_each_head_reads_its_own_columns():
    """Plain multi-head attention, batch 1, n = 64 (a multiple of the block): the sparse output differs from dense
    causal attention, and swapping the two heads' column sets changes it."""
    length, window, block = 64, 8, 4
    query, key, value, gen = random_inputs(1, 1, 2, 2, length)
    columns = torch.stack([torch.randperm(length, generator=gen)[:6] for _ in range(2)])[None]
    valid = torch.ones(1, length, dtype=torch.bool)
    kwargs = dict(scaling=0.25, window_size=window, block_size=block, flex_block_size=TILE)
    output = vertical_slash_attention(query, key, value, columns, **kwargs)
    expected = oracle(query, key, value, oracle_mask(length, columns, valid, window, block), 0.25)
    torch.testing.assert_close(output, expected, atol=2e-5, rtol=2e-5)
    dense = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.25).transpose(1, 2)
    assert (output - dense).abs().max() > 0.1
    swapped = vertical_slash_attention(query, key, value, columns.flip(1), **kwargs)
    assert (swapped - output).abs().max() > 0.1
    # With a band that reaches back to position 0 the mask is plain causal attention.
    wide = vertical_slash_attention(query, key, value, columns, **{**kwargs, "window_size": length})
    torch.testing.assert_close(wide, dense, atol=2e-5, rtol=2e-5)


def test_a_padded_row_gets_what_it_gets_alone():
    """The official code runs one row at a time: a left-padded row of a batch gives what the masked oracle gives for
    that row alone, unpadded (blocks from its own first token), whether it is sparse or dense (plain causal SDPA),
    beside a sparse unpadded row."""
    length, pad, window, block = 50, 7, 8, 4
    query, key, value, gen = random_inputs(5, 2, 4, 2, length)
    columns = torch.randint(0, length, (2, 2, 6), generator=gen)
    key_valid = torch.ones(2, length, dtype=torch.bool)
    key_valid[1, :pad] = False
    columns[1] = columns[1].clamp(min=pad)
    kwargs = dict(scaling=0.25, window_size=window, block_size=block, flex_block_size=TILE)
    alone = [query[1:, :, pad:], key[1:, :, pad:], value[1:, :, pad:]]
    everything = torch.ones(1, length, dtype=torch.bool)
    first = oracle(query[:1], key[:1], value[:1], oracle_mask(length, columns[:1], everything, window, block), 0.25)
    for sparse in (True, False):
        batched = vertical_slash_attention(query, key, value, columns, key_valid=key_valid,
                                           sparse_rows=torch.tensor([True, sparse]), **kwargs)
        if sparse:
            mask = oracle_mask(length - pad, columns[1:] - pad, everything[:, pad:], window, block)
            single = oracle(*alone, mask, 0.25)
        else:
            single = F.scaled_dot_product_attention(*alone, is_causal=True, scale=0.25, enable_gqa=True)
            single = single.transpose(1, 2)
        torch.testing.assert_close(batched[1:, pad:], single, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(batched[:1], first, atol=2e-5, rtol=2e-5)


def test_bf16_inputs():
    length, window, block = 50, 16, 8
    query, key, value, gen = random_inputs(2, 2, 4, 2, length, dtype=torch.bfloat16)
    columns = torch.randint(0, length, (2, 2, 7), generator=gen)
    key_valid = torch.ones(2, length, dtype=torch.bool)
    key_valid[1, :9] = False
    output = vertical_slash_attention(
        query, key, value, columns, scaling=0.25, key_valid=key_valid, window_size=window, block_size=block,
        flex_block_size=TILE,
    )
    expected = oracle(query, key, value, oracle_mask(length, columns, key_valid, window, block), 0.25)
    assert output.dtype == torch.bfloat16 and torch.isfinite(output).all()
    torch.testing.assert_close(output.float(), expected, atol=3e-2, rtol=3e-2)


def test_scores_to_columns_to_attention_equals_the_masked_oracle():
    """The SpecKV wiring on a small random layer: columns from eager attention probabilities of the last rows (softmax
    of q.k, causal and padding masked, max over those rows and the query heads of a KV head, top-k), then the sparse
    attention, equal the oracle whose columns come from the same probabilities ranked independently here."""
    length, window, block, last_rows, count = 72, 8, 4, 6, 10
    query, key, value, _ = random_inputs(3, 2, 4, 2, length)
    key_valid = torch.ones(2, length, dtype=torch.bool)
    key_valid[0, :5] = False
    group = 2
    logits = query[:, :, -last_rows:] @ key.repeat_interleave(group, dim=1).transpose(-1, -2) * 0.25
    rows = torch.arange(length - last_rows, length)[:, None]
    visible = (torch.arange(length)[None, :] <= rows)[None, None] & key_valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    scores = probs.amax(dim=2).reshape(2, 2, group, length).amax(dim=2)  # (batch, kv heads, keys)

    columns = vertical_columns(scores, count)
    output = vertical_slash_attention(
        query, key, value, columns, scaling=0.25, key_valid=key_valid, window_size=window, block_size=block,
        flex_block_size=TILE,
    )
    # Independent ranking: the `count` largest scores, by a Python sort of (score, position) pairs.
    expected_columns = torch.tensor(
        [
            [sorted(sorted(range(length), key=lambda p: (-scores[b, h, p].item(), p))[:count]) for h in range(2)]
            for b in range(2)
        ]
    )
    assert torch.equal(columns, expected_columns)
    mask = oracle_mask(length, expected_columns, key_valid, window, block)
    torch.testing.assert_close(output, oracle(query, key, value, mask, 0.25), atol=2e-5, rtol=2e-5)


def test_vertical_columns_hand_case_with_ties():
    scores = torch.tensor([[[0.1, 0.5, 0.5, 0.2, 0.5, 0.0], [3.0, 1.0, 2.0, 2.0, 0.0, 3.0]]])
    assert vertical_columns(scores, 2).tolist() == [[[1, 2], [0, 5]]]  # ties go to the earlier position
    assert vertical_columns(scores, 4).tolist() == [[[1, 2, 3, 4], [0, 2, 3, 5]]]
    assert vertical_columns(scores, 9).tolist() == [[[0, 1, 2, 3, 4, 5]] * 2]
    assert vertical_columns(scores, 0).shape == (1, 2, 0)
    assert vertical_columns(scores, 2).dtype == torch.long


def test_bad_shapes_are_refused():
    query, key, value, _ = random_inputs(0, 1, 3, 2, 8)
    with pytest.raises(ValueError, match="query heads"):
        vertical_slash_attention(query, key, value, torch.zeros(1, 2, 1, dtype=torch.long), scaling=1.0)
    query, key, value, _ = random_inputs(0, 1, 4, 2, 8)
    with pytest.raises(ValueError, match="vertical_indices"):
        vertical_slash_attention(query, key, value, torch.zeros(1, 4, 1, dtype=torch.long), scaling=1.0)


def test_missing_flex_attention_says_what_is_needed(monkeypatch):
    real_import = builtins.__import__

    def no_flex(name, *args, **kwargs):
        if name.startswith("torch.nn.attention"):
            raise ImportError("no flex here")
        return real_import(name, *args, **kwargs)

    sparse_attention._flex.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_flex)
    try:
        query, key, value, _ = random_inputs(0, 1, 2, 2, 8)
        with pytest.raises(ImportError, match="FlexAttention"):
            vertical_slash_attention(query, key, value, torch.zeros(1, 2, 1, dtype=torch.long), scaling=1.0)
    finally:
        monkeypatch.undo()
        sparse_attention._flex.cache_clear()


def test_ragged_final_block_ends_a_whole_block_after_its_start():
    """MInference's index kernel sets the block end to `start + block_size` even past the sequence end, so the last
    rows of a ragged final block see the band `[start - window, i]`, not `[n - window - block, i]`."""
    length, window, block = 38, 8, 4  # final block starts at 36: band from 28 (a block end of n = 38 would give 26)
    query, key, value, _ = random_inputs(4, 1, 2, 2, length)
    columns = torch.zeros(1, 2, 0, dtype=torch.long)
    valid = torch.ones(1, length, dtype=torch.bool)
    output = vertical_slash_attention(
        query, key, value, columns, scaling=0.25, window_size=window, block_size=block, flex_block_size=TILE
    )
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    sequence_end_rule = (j <= i) & (j >= torch.clamp((i // block + 1) * block, max=length) - window - block)
    other = oracle(query, key, value, sequence_end_rule.expand(1, 2, -1, -1), 0.25)
    expected = oracle(query, key, value, oracle_mask(length, columns, valid, window, block), 0.25)
    torch.testing.assert_close(output, expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(output[:, :36], other[:, :36], atol=2e-5, rtol=2e-5)
    assert (output[:, 36:] - other[:, 36:]).abs().max() > 1e-3
