"""Fused Triton kernels for the window attention scores, without materialising the `(H, W, N)` probabilities.

Two passes, each one program per tile:

1. `_row_logsumexp_kernel`: for a block of window rows of one query head, the log-sum-exp of the scaled logits over
   every key the row may see (causal inside the window, padding removed), with an online max/sum over key blocks;
2. `_window_scores_kernel`: for a block of keys of one KV head, `exp(q·k·scale − lse)` for every window row of every
   query head in the group, reduced by max (or summed) into one fp32 score per key.

Pooling and top-k stay in torch: they read the `(batch, num_kv_heads, num_keys)` scores once, which is `W·G` times
less data than the scoring reads, and torch runs each as a single kernel already.

Only imported when a Triton path is requested, so `import hf_specapprox` never needs Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_logsumexp_kernel(
    Q, K, KEY_VALID, LSE,
    stride_qb, stride_qh, stride_qw, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vn,
    num_heads, group, window, num_keys, head_dim, query_offset, scaling,
    BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_w = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_head = h // group
    rows = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qw + dims[None, :] * stride_qd,
        mask=(rows[:, None] < window) & (dims[None, :] < head_dim),
        other=0.0,
    )
    query_pos = query_offset + rows
    running_max = tl.full((BLOCK_W,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_W,), tl.float32)
    last_visible = tl.minimum(num_keys, query_offset + pid_w * BLOCK_W + BLOCK_W)
    for start in range(0, last_visible, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(
            K + b * stride_kb + kv_head * stride_kh + cols[None, :] * stride_kn + dims[:, None] * stride_kd,
            mask=(cols[None, :] < num_keys) & (dims[:, None] < head_dim),
            other=0.0,
        )
        valid = tl.load(KEY_VALID + b * stride_vb + cols * stride_vn, mask=cols < num_keys, other=0) != 0
        if IEEE:
            logits = tl.dot(q, k, input_precision="ieee") * scaling
        else:
            logits = tl.dot(q, k) * scaling
        visible = (cols[None, :] <= query_pos[:, None]) & valid[None, :] & (cols[None, :] < num_keys)
        logits = tl.where(visible, logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.where(visible, tl.exp(logits - safe_max[:, None]), 0.0)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(probs, axis=1)
        running_max = new_max
    has_keys = running_sum > 0
    lse = tl.where(has_keys, running_max + tl.log(tl.where(has_keys, running_sum, 1.0)), float("-inf"))
    tl.store(LSE + pid_bh * window + rows, lse, mask=rows < window)


@triton.jit
def _window_scores_kernel(
    Q, K, KEY_VALID, LSE, OUT,
    stride_qb, stride_qh, stride_qw, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vn,
    num_kv_heads, group, window, num_keys, head_dim, query_offset, scaling,
    REDUCE_MAX: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    for g in range(0, group):
        h = kv_head * group + g
        for start in range(0, window, BLOCK_W):
            rows = start + tl.arange(0, BLOCK_W)
            q = tl.load(
                Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qw + dims[None, :] * stride_qd,
                mask=(rows[:, None] < window) & (dims[None, :] < head_dim),
                other=0.0,
            )
            # Rows that must not vote carry lse = +inf, so their probabilities are exactly 0.
            lse = tl.load(LSE + (b * num_kv_heads * group + h) * window + rows, mask=rows < window, other=float("inf"))
            if IEEE:
                logits = tl.dot(q, k, input_precision="ieee") * scaling
            else:
                logits = tl.dot(q, k) * scaling
            visible = (cols[None, :] <= (query_offset + rows)[:, None]) & key_ok[None, :] & (rows[:, None] < window)
            probs = tl.where(visible, tl.exp(logits - lse[:, None]), 0.0)
            if REDUCE_MAX:
                acc = tl.maximum(acc, tl.max(probs, axis=0))
            else:
                acc += tl.sum(probs, axis=0)
    tl.store(OUT + pid_bkv * num_keys + cols, acc, mask=cols < num_keys)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def window_scores_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    scaling: float,
    query_offset: int,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    reduction: str = "max",
    block_w: int = 32,
    block_n: int = 64,
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
    block_d = _block_d(head_dim)

    lse = torch.empty(batch, num_heads, window, dtype=torch.float32, device=device)
    _row_logsumexp_kernel[(batch * num_heads, triton.cdiv(window, block_w))](
        queries, keys, key_valid, lse,
        *queries.stride(), *keys.stride(), *key_valid.stride(),
        num_heads, group, window, num_keys, head_dim, query_offset, float(scaling),
        BLOCK_W=block_w, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=ieee,
    )
    row_valid = torch.isfinite(lse)
    if query_valid is not None:
        row_valid &= query_valid.to(device=device, dtype=torch.bool)[:, None, :]
    lse = torch.where(row_valid, lse, torch.full_like(lse, float("inf")))

    scores = torch.empty(batch, num_kv_heads, num_keys, dtype=torch.float32, device=device)
    _window_scores_kernel[(batch * num_kv_heads, triton.cdiv(num_keys, block_n))](
        queries, keys, key_valid, lse, scores,
        *queries.stride(), *keys.stride(), *key_valid.stride(),
        num_kv_heads, group, window, num_keys, head_dim, query_offset, float(scaling),
        REDUCE_MAX=reduction == "max", BLOCK_W=block_w, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=ieee,
    )
    if reduction == "mean":
        counts = row_valid.reshape(batch, num_kv_heads, group * window).sum(-1, keepdim=True)
        scores = scores / counts.clamp(min=1)
    return scores
