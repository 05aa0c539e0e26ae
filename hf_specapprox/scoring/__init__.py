"""Attention scoring used to rank prompt keys: one public function with a torch reference implementation.

`window_scores` dispatches to the implementation for the tensors it gets. Today that is always the chunked torch
reference; a fused Triton path for CUDA tensors is tracked separately and must match the reference.
"""

from .reference import window_scores_torch
from .select import pool_scores, select_kept_positions


def window_scores(queries, keys, **kwargs):
    """Window attention scores per (batch, KV head, key); see [`~scoring.reference.window_scores_torch`]."""
    return window_scores_torch(queries, keys, **kwargs)


__all__ = ["window_scores", "window_scores_torch", "pool_scores", "select_kept_positions"]
