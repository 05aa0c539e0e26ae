"""Turning per-key scores into the kept prompt positions: pooling along keys, top-k per KV head, sorting."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` best scores along the last axis, best first; equal scores (pooling makes plateaus) are
    taken in position order, so the choice does not depend on padding or on the device's `topk`."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]


def pool_scores(scores: torch.Tensor, kernel_size: int, pool_type: str) -> torch.Tensor:
    """1-D pooling along the last axis with stride 1 and `kernel_size // 2` padding (output length unchanged).

    `"max"` pads with -inf (PyTorch's `max_pool1d`), `"mean"` with zeros (`avg_pool1d`, padding counted), exactly as
    the paper's SpecKV code does.
    """
    if kernel_size == 1:
        return scores
    if kernel_size % 2 == 0:
        raise ValueError(f"`kernel_size` must be odd, got {kernel_size}.")
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if pool_type == "max":
        pooled = F.max_pool1d(flat, kernel_size=kernel_size, stride=1, padding=kernel_size // 2)
    elif pool_type == "mean":
        pooled = F.avg_pool1d(flat, kernel_size=kernel_size, stride=1, padding=kernel_size // 2)
    else:
        raise ValueError(f"`pool_type` must be 'max' or 'mean', got {pool_type!r}.")
    return pooled.reshape(shape)


def select_kept_positions(
    candidate_scores: torch.Tensor,
    candidate_valid: torch.Tensor | None,
    num_selected: int,
    window_positions: torch.Tensor,
) -> torch.Tensor:
    """Per KV head, the `num_selected` best candidates plus the always-kept window, sorted by position.

    Equal scores are taken in position order. Padding candidates rank below every real token, so a row keeps padding
    only when it has fewer real candidates than `num_selected`; sorted by position, that padding then sits at the
    front of the row, where the attention mask hides it.

    Args:
        candidate_scores (`torch.Tensor` of shape `(batch, num_kv_heads, num_candidates)`):
            Pooled scores of the candidate positions `0 .. num_candidates - 1`.
        candidate_valid (`torch.BoolTensor` of shape `(batch, num_candidates)`, *optional*):
            False for padding positions.
        num_selected (`int`):
            How many candidates to keep (at most `num_candidates`).
        window_positions (`torch.LongTensor` of shape `(window,)`):
            Positions kept unconditionally; all larger than any candidate.

    Returns:
        `torch.LongTensor` of shape `(batch, num_kv_heads, num_selected + window)`, increasing along the last axis.
    """
    batch, num_kv_heads, num_candidates = candidate_scores.shape
    num_selected = min(num_selected, num_candidates)
    scores = candidate_scores.float()
    if candidate_valid is not None:
        scores = scores.masked_fill(~candidate_valid[:, None, :].bool(), float("-inf"))
    selected = _top_indices(scores, num_selected).sort(dim=-1).values
    window = window_positions.to(selected.device).expand(batch, num_kv_heads, -1)
    return torch.cat([selected, window], dim=-1)


def neighbour_offsets(num_neighbours: int) -> torch.Tensor:
    """Offsets `-⌊(n−1)/2⌋ … n−1−⌊(n−1)/2⌋`, nearest first, left before right: `0, −1, +1, −2, +2, …`."""
    first = -((num_neighbours - 1) // 2)
    offsets = torch.arange(first, first + num_neighbours)
    order = torch.sort(offsets.abs(), stable=True).indices
    return offsets[order]


def zero_padded_pool(scores: torch.Tensor, kernel_size: int, pool_type: str) -> torch.Tensor:
    """SpecPC's smoothing: zero padding of `(k−1)//2` left and `k−1−(k−1)//2` right, then stride-1 pooling (any k)."""
    if kernel_size == 1:
        return scores
    left = (kernel_size - 1) // 2
    padded = F.pad(scores[:, None, :].float(), (left, kernel_size - 1 - left), value=0.0)
    if pool_type == "max":
        pooled = F.max_pool1d(padded, kernel_size=kernel_size, stride=1)
    elif pool_type in ("mean", "avg"):
        pooled = F.avg_pool1d(padded, kernel_size=kernel_size, stride=1)
    else:
        raise ValueError(f"`pool_type` must be 'max' or 'mean', got {pool_type!r}.")
    return pooled[:, 0, :]


def specpc_keep_mask(
    scores: torch.Tensor,
    valid: torch.Tensor,
    *,
    max_capacity_prompt: int,
    window_size: int,
    kernel_size: int,
    neighbor_tokens: int,
    pool_type: str = "max",
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """SpecPC's token selection (paper §3.1 steps 3–6), vectorised over a left-padded batch.

    Per row: pool the scores, rank the real tokens, expand each ranked token by its neighbours (nearest first), put the
    protected tokens and the last `window_size` tokens first, keep the first occurrence of every position in that
    order and cut to `max_capacity_prompt` — or to more, if the protected tokens and the window alone exceed it.

    Args:
        scores (`torch.Tensor` of shape `(batch, length)`): per-token importance (padding ignored).
        valid (`torch.BoolTensor` of shape `(batch, length)`): False on left padding.
        protected (`torch.BoolTensor` of shape `(batch, length)`, *optional*): tokens that are always kept.

    Returns:
        `torch.BoolTensor` of shape `(batch, length)`: the kept positions.
    """
    batch, length = scores.shape
    device = scores.device
    valid = valid.bool()
    real = valid.sum(-1)  # (B,)
    first_real = length - real
    positions = torch.arange(length, device=device)

    pooled = zero_padded_pool(scores.float().masked_fill(~valid, 0.0), kernel_size, pool_type)
    pooled = pooled.masked_fill(~valid, float("-inf"))
    num_ranked = min(max_capacity_prompt, length)
    ranked = _top_indices(pooled, num_ranked)  # (B, R), best first
    ranked_ok = valid.gather(1, ranked)
    offsets = neighbour_offsets(neighbor_tokens).to(device)
    expanded = ranked[:, :, None] + offsets  # (B, R, n), rank-major
    expanded = torch.maximum(expanded, first_real[:, None, None]).clamp(max=length - 1)
    expanded_ok = ranked_ok[:, :, None].expand_as(expanded)

    in_window = positions[None, :] >= (length - torch.minimum(real, torch.tensor(window_size, device=device)))[:, None]
    always = in_window & valid
    if protected is not None:
        always = always | (protected.bool() & valid)
    # Order of appearance: always-kept positions get -1 (before everything), then the expanded list.
    big = torch.iinfo(torch.long).max
    first_seen = torch.full((batch, length), big, dtype=torch.long, device=device)
    order = torch.arange(expanded.shape[1] * expanded.shape[2], device=device).expand(batch, -1)
    order = torch.where(expanded_ok.reshape(batch, -1), order, torch.full_like(order, big))
    first_seen.scatter_reduce_(1, expanded.reshape(batch, -1), order, reduce="amin")
    first_seen = torch.where(always, torch.full_like(first_seen, -1), first_seen)
    first_seen = torch.where(valid, first_seen, torch.full_like(first_seen, big))

    budget = torch.maximum(torch.minimum(real, torch.tensor(max_capacity_prompt, device=device)), always.sum(-1))
    rank_of_position = torch.empty_like(first_seen)
    rank_of_position.scatter_(1, torch.sort(first_seen, dim=-1, stable=True).indices, positions.expand(batch, -1))
    return (rank_of_position < budget[:, None]) & (first_seen < big)


def chunk_keep_mask(
    scores: torch.Tensor,
    valid: torch.Tensor,
    *,
    max_capacity_prompt: int,
    chunk_size: int,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fixed-chunk selection (SpecPrefill-style): chunks of `chunk_size` tokens from each row's first real token are
    ranked by their mean score and taken whole, best first, until `max_capacity_prompt` tokens (protected first).

    Returns:
        `torch.BoolTensor` of shape `(batch, length)`: the kept positions.
    """
    batch, length = scores.shape
    device = scores.device
    valid = valid.bool()
    real = valid.sum(-1)
    positions = torch.arange(length, device=device)
    chunk = ((positions[None, :] - (length - real)[:, None]).clamp(min=0) // chunk_size)  # (B, L)
    num_chunks = -(-length // chunk_size)
    sums = torch.zeros(batch, num_chunks, device=device).scatter_add_(1, chunk, scores.float() * valid)
    counts = torch.zeros(batch, num_chunks, device=device).scatter_add_(1, chunk, valid.float())
    means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("-inf")))
    chunk_rank = torch.empty_like(chunk[:, :num_chunks])
    order = torch.sort(means, dim=-1, descending=True, stable=True).indices
    chunk_rank.scatter_(1, order, torch.arange(num_chunks, device=device).expand(batch, -1))
    always = torch.zeros_like(valid) if protected is None else protected.bool() & valid
    # Sort key: protected first, then by chunk rank, then by position; padding last.
    key = chunk_rank.gather(1, chunk) * length + positions[None, :]
    key = torch.where(always, positions[None, :] - length, key)
    key = torch.where(valid, key, torch.full_like(key, torch.iinfo(torch.long).max))
    budget = torch.maximum(torch.minimum(real, torch.tensor(max_capacity_prompt, device=device)), always.sum(-1))
    rank_of_position = torch.empty_like(key)
    rank_of_position.scatter_(1, torch.sort(key, dim=-1, stable=True).indices, positions.expand(batch, -1))
    return (rank_of_position < budget[:, None]) & valid
