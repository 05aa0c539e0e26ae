"""Vertical-slash sparse attention: the sparse prefill of the paper's SpecKV code (MInference's kernel), in torch.

The official code replaces the dense prefill attention of every compressing layer by MInference's
`vertical_slash_sparse_attention` once the sequence is longer than 4,096 tokens: a query block of 64 rows sees a causal
band of the last 2,112 keys before its block end (33 "slash" diagonals every 64 positions, 64x64 blocks) plus the
2,048 best-scoring keys of its KV head (the "vertical" columns). This module computes the same attention with
FlexAttention (`torch.compile(flex_attention)`) instead of a hand-written kernel, doing only the sparse work: the
vertical keys are gathered in front of the sequence's keys, and the block mask lists the column tiles and the band
tiles each query tile needs.

Why one call and not a band attention plus a dense column attention merged by log-sum-exp: compiled FlexAttention on
CPU does not return the log-sum-exp (torch 2.13: "torch.compile on CPU only supports inference and `return_lse` is
not supported yet"). Putting the scattered columns at their own positions in the block mask instead would touch
nearly every key tile (measured 2.5x slower than dense SDPA at 8K on CPU).

Compilation: the batch size, head counts, head size, dtype and `flex_block_size` are static (a new value compiles
again, ~10 s on CPU); the sequence length and the number of columns become dynamic after the second distinct value.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["vertical_columns", "vertical_slash_attention"]


def vertical_columns(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The best-scoring key positions of each KV head: the vertical columns of the sparse prefill.

    Args:
        scores (`torch.Tensor` of shape `(batch, num_kv_heads, num_candidates)`):
            One score per candidate key position, already pooled by the caller.
        count (`int`):
            How many columns to keep per KV head (2,048 in the paper).

    Returns:
        `torch.LongTensor` of shape `(batch, num_kv_heads, min(count, num_candidates))`: candidate positions sorted
        increasing. Equal scores are taken in position order (a stable sort), so the choice does not depend on the
        device's `topk`.
    """
    if count < 0:
        raise ValueError(f"`count` must be non-negative, got {count}.")
    best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]
    return best.sort(dim=-1).values


@functools.lru_cache(maxsize=None)
def _flex():
    """`(compiled flex_attention, BlockMask)`, imported and compiled once per process."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError as error:  # torch < 2.5
        raise ImportError(
            "vertical_slash_attention needs FlexAttention (`torch.nn.attention.flex_attention`, torch >= 2.5), "
            f"which this torch {torch.__version__} does not have. Upgrade torch or use the dense prefill."
        ) from error
    return torch.compile(flex_attention), BlockMask


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A boolean block map `(..., q_blocks, kv_blocks)` as FlexAttention's `(num_blocks, indices)` int32 pair."""
    order = torch.sort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return blocks.sum(-1).to(torch.int32), order.to(torch.int32)


@torch.no_grad()
def vertical_slash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    vertical_indices: torch.Tensor,
    *,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    sparse_rows: torch.Tensor | None = None,
    window_size: int = 2048,
    block_size: int = 64,
    flex_block_size: int = 128,
) -> torch.Tensor:
    """Vertical-slash sparse causal self-attention, the mask MInference's `vertical_slash_sparse_attention` computes
    when the paper's SpecKV prefill calls it.

    Query rows are grouped in blocks of `block_size` aligned to each row's first valid position `o` (0 without left
    padding), so that a left-padded row gets the blocks it would get alone. A query at position `i` in the block
    starting at `s = o + (i - o) // block_size * block_size` sees key `j` iff `j <= i`, `key_valid[j]`, and either
    `j >= s - window_size` (the band: MInference's slash diagonals `window_size, window_size - block_size, ..., 0`
    merged into the keys `[e - window_size - block_size, e)` before the block end `e = s + block_size`) or `j` is one
    of the vertical columns of the query's KV head. As in MInference, the block end of a ragged final block is
    `s + block_size`, not the sequence end. A row that `sparse_rows` marks False attends causally to every valid key
    (the dense prefill a row under the sparse threshold gets alone). Rows that see no key return zeros.

    One compiled FlexAttention call does only the sparse work: the `v` vertical keys are gathered in front of the
    sequence's keys, and the block mask lists, for each tile of `flex_block_size` queries, the column tiles some of
    its rows see (columns inside a row's band or at/after the row are masked there, so no key counts twice) and the
    key tiles of its band. Inference only: no gradient flows through the result.

    Args:
        query (`torch.Tensor` of shape `(batch, num_heads, n, head_dim)`):
            Post-RoPE queries; query head `h` reads KV head `h // (num_heads // num_kv_heads)`.
        key (`torch.Tensor` of shape `(batch, num_kv_heads, n, head_dim)`):
            Post-RoPE keys of the same `n` positions.
        value (`torch.Tensor` of shape `(batch, num_kv_heads, n, head_dim)`):
            Values of the same positions.
        vertical_indices (`torch.LongTensor` of shape `(batch, num_kv_heads, v)`):
            Key positions in `[0, n)` that every query head of a KV head also sees (e.g. from [`vertical_columns`]);
            any order, repeats are counted once.
        scaling (`float`):
            Softmax scale, usually `head_dim ** -0.5`.
        key_valid (`torch.BoolTensor` of shape `(batch, n)`, *optional*):
            False for padding keys, which no query sees. A row's valid keys are one contiguous run (left padding
            before it, tokens after an end of sequence behind it); its first one aligns the row's blocks.
        sparse_rows (`torch.BoolTensor` of shape `(batch,)`, *optional*):
            False for rows that attend densely (causal, every valid key); defaults to every row sparse.
        window_size (`int`, *optional*, defaults to 2048):
            Band reach behind a query block's start (the paper's `prefill_window_size`).
        block_size (`int`, *optional*, defaults to 64):
            Query block size of the band (MInference's 64).
        flex_block_size (`int`, *optional*, defaults to 128):
            Tile size of the FlexAttention block mask (a speed knob; the result does not depend on it).

    Returns:
        `torch.Tensor` of shape `(batch, n, num_heads, head_dim)` (the layout transformers' attention functions
        return) in the query's dtype.
    """
    batch, num_heads, length, head_dim = query.shape
    flex_attention, block_mask_class = _flex()
    num_kv_heads = key.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot be grouped over {num_kv_heads} KV heads.")
    if key.shape[2] != length or value.shape[2] != length:
        raise ValueError("vertical_slash_attention is self-attention: query, key and value need the same length.")
    if vertical_indices.dim() != 3 or vertical_indices.shape[:2] != (batch, num_kv_heads):
        raise ValueError(
            f"`vertical_indices` must have shape (batch, num_kv_heads, v) = ({batch}, {num_kv_heads}, v), "
            f"got {tuple(vertical_indices.shape)}."
        )
    if block_size < 1 or flex_block_size < 1 or window_size < 0:
        raise ValueError("`block_size` and `flex_block_size` must be positive and `window_size` non-negative.")
    group, tile, device = num_heads // num_kv_heads, flex_block_size, query.device
    if key_valid is None:
        key_valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    key_valid = key_valid.to(device=device, dtype=torch.bool)
    if sparse_rows is None:
        sparse_rows = torch.ones(batch, dtype=torch.bool, device=device)
    # Per row: where its blocks start (its first valid position) and how far its band reaches behind a block start
    # (past position 0 for a dense row, whose band then holds every key).
    origin = key_valid.long().argmax(dim=-1)
    reach = torch.where(sparse_rows.to(device=device, dtype=torch.bool), window_size, 2 * length + block_size)

    def band_start(position):  # (batch, *position.shape): first key of the band of the query at `position`
        shape = (batch,) + (1,) * position.dim()
        start, behind = origin.view(shape), reach.view(shape)
        return start + torch.div(position - start, block_size, rounding_mode="floor") * block_size - behind

    # Vertical columns, sorted, in whole tiles; repeats, padding keys and the filler get the position `length`, which
    # no query sees. A query sees the columns below its band start: a prefix of each head's list.
    columns = vertical_indices.to(device=device, dtype=torch.long).sort(dim=-1).values
    usable = key_valid.gather(1, columns.reshape(batch, -1)).reshape(columns.shape)
    usable[..., 1:] &= columns[..., 1:] != columns[..., :-1]
    num_columns = max(1, -(-columns.shape[-1] // tile)) * tile
    columns = F.pad(columns.masked_fill(~usable, length), (0, num_columns - columns.shape[-1]), value=length)
    columns = columns.sort(dim=-1).values

    # Key slots: the gathered columns, then the whole sequence. `slots` holds each slot's sequence position
    # (`length` where nothing may see it), per query head and padded to whole tiles; the mask reads only this table
    # and the `sizes` tensor (no Python ints or shapes), so a new length reuses the compiled kernel.
    gather_at = columns.clamp(max=length - 1)[..., None].expand(-1, -1, -1, head_dim)
    keys = torch.cat([key.gather(2, gather_at), key], dim=2).to(query.dtype)
    values = torch.cat([value.gather(2, gather_at), value], dim=2).to(query.dtype)
    positions = torch.arange(length, device=device).masked_fill(~key_valid, length)  # (B, n)
    slots = torch.cat([columns, positions[:, None].expand(-1, num_kv_heads, -1)], dim=-1)
    slots = F.pad(slots, (0, -slots.shape[-1] % tile), value=length).repeat_interleave(group, dim=1)
    sizes = torch.tensor([block_size, num_columns], device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        position = slots[b, h, kv_idx]
        block_start = origin[b] + torch.div(q_idx - origin[b], sizes[0], rounding_mode="floor") * sizes[0]
        below_band = position < block_start - reach[b]
        return (position <= q_idx) & (below_band == (kv_idx < sizes[1]))  # columns below the band, keys in it

    # Tiles (query tile x key-slot tile) where some pair is visible ("any") and where all are ("full": FlexAttention
    # skips the mask there). Only these tiles are computed.
    first = torch.arange(0, length, tile, device=device)
    last = (first + tile).clamp(max=length) - 1
    # (B, Hkv, query tiles, column tiles)
    column_any = columns[..., None, 0::tile] < band_start(last)[:, None, :, None]
    column_full = columns[..., None, tile - 1 :: tile] < band_start(first)[:, None, :, None]
    key_first, key_last = first[None, :], last[None, :]  # sequence tiles along the last dim
    band_any = (key_first <= last[:, None]) & (band_start(torch.maximum(first[:, None], key_first)) <= key_last)
    band_full = (band_start(last)[..., None] <= key_first) & (key_last <= first[:, None])
    band_full &= key_last - key_first == tile - 1  # a ragged last tile is left to the mask
    valid_tiles = F.pad(key_valid, (0, len(first) * tile - length)).reshape(batch, 1, 1, -1, tile)
    shape = (batch, num_kv_heads, len(first), -1)
    any_tile = torch.cat([column_any, (band_any[:, None] & valid_tiles.any(-1)).expand(shape)], dim=-1)
    full_tile = torch.cat([column_full, (band_full[:, None] & valid_tiles.all(-1)).expand(shape)], dim=-1)
    any_tile, full_tile = any_tile.repeat_interleave(group, dim=1), full_tile.repeat_interleave(group, dim=1)
    block_mask = block_mask_class.from_kv_blocks(
        *_ordered(any_tile & ~full_tile),
        *_ordered(full_tile),
        BLOCK_SIZE=tile,
        mask_mod=mask_mod,
        seq_lengths=(length, num_columns + length),
    )

    query = query.view(query.shape)  # a new tensor object, so marking it leaves the caller's tensor alone
    for tensor in (query, keys, values, slots, origin, reach):
        # CPU inductor (torch 2.13) miscompiles the mask when the batch size or a head layout becomes symbolic (as
        # dynamo makes a size that changed between calls): only sequence lengths may be dynamic.
        dims = range(tensor.dim() - 1) if tensor is slots else (0,) if tensor.dim() == 1 else (0, 1, 3)
        for dim in dims:
            torch._dynamo.mark_static(tensor, dim)
    output = flex_attention(query, keys, values, block_mask=block_mask, scale=scaling, enable_gqa=group > 1)
    return output.transpose(1, 2).contiguous()
