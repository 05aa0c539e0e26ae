"""Kernels: attention scoring used to rank prompt keys (one public function, two implementations), the selection
helpers (pooling, top-k, SpecPC's neighbour expansion) and the sparse (vertical-slash) prefill attention.

[`window_scores`] dispatches to the fused Triton kernels for CUDA tensors when Triton is installed with a working
driver, and to the chunked torch reference otherwise. `implementation="torch"` / `"triton"` forces one (tests run the
Triton kernels on CPU tensors under `TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

from transformers.utils import logging

from .reference import window_scores_torch
from .select import pool_scores, select_kept_positions

IMPLEMENTATIONS = ("auto", "torch", "triton")

logger = logging.get_logger(__name__)


@lru_cache(maxsize=None)
def triton_is_usable() -> bool:
    """Whether Triton is installed and can launch kernels here (a GPU driver, or the interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    try:
        from triton.runtime import driver

        driver.active.get_current_device()
    except Exception:
        return False
    return True


def window_scores(queries, keys, *, implementation: str = "auto", **kwargs):
    """Window attention scores per (batch, KV head, key); see [`~scoring.reference.window_scores_torch`].

    Args:
        implementation (`str`, *optional*, defaults to `"auto"`):
            `"auto"` (Triton for CUDA tensors when usable, else torch), `"torch"` or `"triton"`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"`implementation` must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
    if implementation == "auto":
        implementation = "triton" if queries.is_cuda and triton_is_usable() else "torch"
        if queries.is_cuda and implementation == "torch":
            logger.warning_once(
                "hf_specapprox scoring: Triton is not usable here (not installed, or no working driver), so the "
                "chunked torch reference scores CUDA tensors; it is exact but slower. `pip install triton`, or pass "
                "scoring_implementation='torch' to choose it explicitly."
            )
    if implementation == "triton":
        if not triton_is_usable():
            raise RuntimeError(
                "The Triton scoring kernels need Triton with a GPU driver (or TRITON_INTERPRET=1 for tests): "
                "`pip install triton`, or use implementation='torch'."
            )
        from .triton_kernels import window_scores_triton

        kwargs.pop("chunk_size", None)
        return window_scores_triton(queries, keys, **kwargs)
    return window_scores_torch(queries, keys, **kwargs)


__all__ = ["window_scores", "window_scores_torch", "pool_scores", "select_kept_positions", "triton_is_usable"]
