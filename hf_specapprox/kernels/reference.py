"""Plain-torch reference of the window attention scores (the specification the Triton kernels are tested against)."""

from __future__ import annotations

import torch

REDUCTIONS = ("max", "mean")


def window_scores_torch(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    scaling: float,
    query_offset: int,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    reduction: str = "max",
    query_weights: torch.Tensor | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Attention that a window of queries pays to every key, reduced to one score per (batch, KV head, key).

    Each query row gets a real softmax over all keys it may see (causal, padding removed), computed in fp32. The
    probabilities are then reduced over the window queries and over the query heads that share a KV head (the
    `repeat_kv` layout: query head `h` reads KV head `h // group_size`).

    Keys are processed in chunks of `chunk_size` in two passes (row log-sum-exp, then normalised probabilities), so
    the peak extra memory is `O(B * H * W * chunk_size)` instead of `O(B * H * W * N)`.

    Args:
        queries (`torch.Tensor` of shape `(batch, num_heads, window, head_dim)`):
            Post-RoPE queries of the scoring rows.
        keys (`torch.Tensor` of shape `(batch, num_kv_heads, num_keys, head_dim)`):
            Post-RoPE keys of the whole sequence.
        scaling (`float`):
            Softmax scale, usually `head_dim ** -0.5`.
        query_offset (`int`):
            Sequence index of the first query row: query `i` sees keys `j <= query_offset + i`.
        key_valid (`torch.BoolTensor` of shape `(batch, num_keys)`, *optional*):
            False for padding keys, which get probability 0.
        query_valid (`torch.BoolTensor` of shape `(batch, window)`, *optional*):
            False for query rows that must not vote (padding); they contribute nothing.
        reduction (`str`, *optional*, defaults to `"max"`):
            `"max"` or `"mean"` over the valid (query head, window query) pairs of each KV head.
        query_weights (`torch.Tensor` of shape `(window,)`, *optional*):
            Non-negative weight of each window query's probabilities (SpecPC weighs them 0 → 1).
        chunk_size (`int`, *optional*, defaults to 4096):
            Number of keys processed at once.

    Returns:
        `torch.FloatTensor` of shape `(batch, num_kv_heads, num_keys)`: scores in `[0, 1]`; 0 where no valid query
        can see the key.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")
    batch, num_heads, window, head_dim = queries.shape
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot be grouped over {num_kv_heads} KV heads.")
    group = num_heads // num_kv_heads
    device = queries.device

    q = queries.float().reshape(batch, num_kv_heads, group * window, head_dim) * scaling
    query_pos = (query_offset + torch.arange(window, device=device)).repeat(group)  # (G*W,)
    if query_valid is None:
        query_valid = torch.ones(batch, window, dtype=torch.bool, device=device)
    row_valid = query_valid.bool().repeat(1, group)[:, None, :]  # (B, 1, G*W)

    def masked_logits(start: int, end: int) -> torch.Tensor:
        logits = torch.matmul(q, keys[:, :, start:end].float().transpose(-1, -2))  # (B, Hkv, G*W, c)
        key_pos = torch.arange(start, end, device=device)
        visible = (key_pos[None, :] <= query_pos[:, None])[None, None]  # (1, 1, G*W, c)
        if key_valid is not None:
            visible = visible & key_valid[:, None, None, start:end].bool()
        return logits.masked_fill(~visible, float("-inf"))

    # Pass 1: log-sum-exp of every query row over all keys it can see.
    lse = torch.full((batch, num_kv_heads, group * window), float("-inf"), device=device)
    for start in range(0, num_keys, chunk_size):
        lse = torch.logaddexp(lse, torch.logsumexp(masked_logits(start, min(start + chunk_size, num_keys)), dim=-1))
    row_valid = row_valid & torch.isfinite(lse)
    lse = torch.where(row_valid, lse, torch.zeros_like(lse))
    row_weight = None
    if query_weights is not None:
        row_weight = query_weights.to(device=device, dtype=torch.float32).repeat(group)[None, None, :, None]

    # Pass 2: normalised probabilities, reduced over the rows of each KV head.
    scores = torch.empty(batch, num_kv_heads, num_keys, device=device)
    for start in range(0, num_keys, chunk_size):
        end = min(start + chunk_size, num_keys)
        probs = torch.exp(masked_logits(start, end) - lse[..., None])
        probs = probs.masked_fill(~row_valid[..., None], 0.0)
        if row_weight is not None:
            probs = probs * row_weight
        if reduction == "max":
            scores[:, :, start:end] = probs.amax(dim=-2)
        else:
            scores[:, :, start:end] = probs.sum(dim=-2)
    if reduction == "mean":
        scores = scores / row_valid.sum(dim=-1, keepdim=True).clamp(min=1)
    return scores
