"""Fused Triton kernels for the window attention scores, without materialising the `(H, W, N)` probabilities.

The rows of one KV head are its `group` query heads × `window` queries, flattened (row `r` is query head
`r // window` of the group and window query `r % window`), so small windows still fill the tiles. Two passes:

1. `_partial_logsumexp_kernel`: for a block of rows and one slice of the keys (the keys are split so that enough
   programs run at once), the running max and sum of `exp(scaled logits)` over the keys each row may see (causal
   inside the window, padding removed). Torch merges the slices into each row's log-sum-exp;
2. `_window_scores_kernel`: for a block of keys, `exp(q·k·scale − lse)` for every row of the KV head, reduced by max
   (or summed) into one fp32 score per key.

Pooling and top-k stay in torch: they read the `(batch, num_kv_heads, num_keys)` scores once, `group × window` times
less data than the scoring reads, and torch runs each as a single kernel already.

Only imported when a Triton path is requested, so `import hf_specapprox` never needs Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_rows(Q, b, kv_head, rows, dims, group, window, head_dim, stride_qb, stride_qh, stride_qw, stride_qd):
    head = kv_head * group + rows // window
    query = rows % window
    pointers = Q + b * stride_qb + head[:, None] * stride_qh + query[:, None] * stride_qw + dims[None, :] * stride_qd
    return tl.load(pointers, mask=(rows[:, None] < group * window) & (dims[None, :] < head_dim), other=0.0)


@triton.jit
def _partial_logsumexp_kernel(
    Q, K, KEY_VALID, PART_MAX, PART_SUM,
    stride_qb, stride_qh, stride_qw, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vn,
    num_kv_heads, group, window, num_keys, head_dim, query_offset, scaling, keys_per_split, num_splits,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    pid_bkv = tl.program_id(0)
    pid_r = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bkv // num_kv_heads
    kv_head = pid_bkv % num_kv_heads
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, b, kv_head, rows, dims, group, window, head_dim, stride_qb, stride_qh, stride_qw, stride_qd)
    query_pos = query_offset + rows % window
    running_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_R,), tl.float32)
    first = split * keys_per_split
    last = tl.minimum(tl.minimum(first + keys_per_split, num_keys), query_offset + window)
    for start in range(first, last, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(
            K + b * stride_kb + kv_head * stride_kh + cols[None, :] * stride_kn + dims[:, None] * stride_kd,
            mask=(cols[None, :] < last) & (dims[:, None] < head_dim),
            other=0.0,
        )
        valid = tl.load(KEY_VALID + b * stride_vb + cols * stride_vn, mask=cols < last, other=0) != 0
        if IEEE:
            logits = tl.dot(q, k, input_precision="ieee") * scaling
        else:
            logits = tl.dot(q, k) * scaling
        visible = (cols[None, :] <= query_pos[:, None]) & valid[None, :] & (cols[None, :] < last)
        logits = tl.where(visible, logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.where(visible, tl.exp(logits - safe_max[:, None]), 0.0)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(probs, axis=1)
        running_max = new_max
    offsets = (pid_bkv * group * window + rows) * num_splits + split
    tl.store(PART_MAX + offsets, running_max, mask=rows < group * window)
    tl.store(PART_SUM + offsets, running_sum, mask=rows < group * window)


@triton.jit
def _window_scores_kernel(
    Q, K, KEY_VALID, LSE, OUT,
    stride_qb, stride_qh, stride_qw, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vn,
    num_kv_heads, group, window, num_keys, head_dim, query_offset, scaling,
    REDUCE_MAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_bkv = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bkv // num_kv_heads
    kv_head = pid_bkv % num_kv_heads
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = tl.load(
        K + b * stride_kb + kv_head * stride_kh + cols[None, :] * stride_kn + dims[:, None] * stride_kd,
        mask=(cols[None, :] < num_keys) & (dims[:, None] < head_dim),
        other=0.0,
    )
    valid = tl.load(KEY_VALID + b * stride_vb + cols * stride_vn, mask=cols < num_keys, other=0) != 0
    key_ok = valid & (cols < num_keys)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    num_rows = group * window
    for start in range(0, num_rows, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        q = _load_rows(Q, b, kv_head, rows, dims, group, window, head_dim, stride_qb, stride_qh, stride_qw, stride_qd)
        # Rows that must not vote carry lse = +inf, so their probabilities are exactly 0.
        lse = tl.load(LSE + pid_bkv * num_rows + rows, mask=rows < num_rows, other=float("inf"))
        if IEEE:
            logits = tl.dot(q, k, input_precision="ieee") * scaling
        else:
            logits = tl.dot(q, k) * scaling
        visible = (cols[None, :] <= (query_offset + rows % window)[:, None]) & key_ok[None, :]
        visible = visible & (rows[:, None] < num_rows)
        probs = tl.where(visible, tl.exp(logits - lse[:, None]), 0.0)
        if REDUCE_MAX:
            acc = tl.maximum(acc, tl.max(probs, axis=0))
        else:
            acc += tl.sum(probs, axis=0)
    tl.store(OUT + pid_bkv * num_keys + cols, acc, mask=cols < num_keys)


def _num_splits(device: torch.device, programs: int, key_blocks: int) -> int:
    """Key slices for pass 1 so that about four programs per multiprocessor run at once."""
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(key_blocks, triton.cdiv(4 * processors, max(programs, 1))))


def window_scores_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    scaling: float,
    query_offset: int,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    reduction: str = "max",
    query_weights: torch.Tensor | None = None,
    block_rows: int = 64,
    block_keys: int = 64,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton implementation of [`~scoring.reference.window_scores_torch`] (same arguments and result).

    fp32 inputs use IEEE fp32 products (no TF32) so results match the reference to rounding; bf16/fp16 inputs use
    the tensor cores with fp32 accumulation.
    """
    if reduction not in ("max", "mean"):
        raise ValueError(f"`reduction` must be 'max' or 'mean', got {reduction!r}.")
    batch, num_heads, window, head_dim = queries.shape
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot be grouped over {num_kv_heads} KV heads.")
    group = num_heads // num_kv_heads
    device = queries.device
    if keys.dtype != queries.dtype:
        keys = keys.to(queries.dtype)
    if key_valid is None:
        key_valid = torch.ones(batch, num_keys, dtype=torch.bool, device=device)
    key_valid = key_valid.to(device=device, dtype=torch.int8)
    ieee = queries.dtype == torch.float32
    block_d = max(16, triton.next_power_of_2(head_dim))
    num_rows = group * window
    row_blocks = triton.cdiv(num_rows, block_rows)
    key_blocks = triton.cdiv(num_keys, block_keys)
    if num_splits is None:
        num_splits = _num_splits(device, batch * num_kv_heads * row_blocks, key_blocks)
    keys_per_split = triton.cdiv(key_blocks, num_splits) * block_keys
    num_splits = triton.cdiv(num_keys, keys_per_split)

    part_max = torch.empty(batch, num_kv_heads, num_rows, num_splits, dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    _partial_logsumexp_kernel[(batch * num_kv_heads, row_blocks, num_splits)](
        queries, keys, key_valid, part_max, part_sum,
        *queries.stride(), *keys.stride(), *key_valid.stride(),
        num_kv_heads, group, window, num_keys, head_dim, query_offset, float(scaling), keys_per_split, num_splits,
        BLOCK_R=block_rows, BLOCK_N=block_keys, BLOCK_D=block_d, IEEE=ieee,
    )
    lse = torch.logsumexp(part_max + part_sum.log(), dim=-1)  # (B, H_kv, G*W); empty slices give -inf
    row_valid = torch.isfinite(lse)
    if query_valid is not None:
        row_valid &= query_valid.to(device=device, dtype=torch.bool).repeat(1, group)[:, None, :]
    lse = torch.where(row_valid, lse, torch.full_like(lse, float("inf")))
    if query_weights is not None:
        # p * weight = exp(q·k·scale − (lse − log weight)); a zero weight gives +inf, i.e. probability 0.
        weights = query_weights.to(device=device, dtype=torch.float32).repeat(group)
        lse = lse - torch.log(weights)[None, None, :]
    lse = lse.contiguous()

    scores = torch.empty(batch, num_kv_heads, num_keys, dtype=torch.float32, device=device)
    _window_scores_kernel[(batch * num_kv_heads, key_blocks)](
        queries, keys, key_valid, lse, scores,
        *queries.stride(), *keys.stride(), *key_valid.stride(),
        num_kv_heads, group, window, num_keys, head_dim, query_offset, float(scaling),
        REDUCE_MAX=reduction == "max", BLOCK_R=block_rows, BLOCK_N=block_keys, BLOCK_D=block_d, IEEE=ieee,
    )
    if reduction == "mean":
        scores = scores / row_valid.sum(-1, keepdim=True).clamp(min=1)
    return scores
