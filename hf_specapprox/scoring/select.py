"""Turning per-key scores into the kept prompt positions: pooling along keys, top-k per KV head, sorting."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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

    Padding candidates rank below every real token, so a row keeps padding only when it has fewer real candidates
    than `num_selected`; sorted by position, that padding then sits at the front of the row, where the attention mask
    hides it.

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
    selected = scores.topk(num_selected, dim=-1).indices.sort(dim=-1).values
    window = window_positions.to(selected.device).expand(batch, num_kv_heads, -1)
    return torch.cat([selected, window], dim=-1)
