"""Selection policies: which prompt positions every compressed layer keeps, given its scorer's candidate scores.

A policy owns what a scorer does not: the always-kept recent window, the attention sinks, how many candidates each
layer keeps (the same number in every layer, or PyramidKV's layer-wise budgets) and the per-KV-head top-k. Rows stay
uniform within a layer (every KV head of a layer keeps the same number of positions), so a smaller layer budget is
memory really saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import LAYER_BUDGETS
from ..kernels import select_kept_positions


def pyramid_budgets(per_layer: int, num_layers: int, num_candidates: int, beta: float) -> list[int]:
    """PyramidKV's layer-wise budgets (Cai et al., 2024, `pyramidkv_utils.py`; kvpress's `PyramidKVPress`).

    The first layer keeps `max = 2 * per_layer - min` candidates and the last `min = per_layer / beta`, linearly in
    between, so the layers keep `num_layers * per_layer` candidates in all, as uniform budgets would. As in PyramidKV,
    `max` is capped at `num_candidates` (and `min` raised to keep the total). The real-valued budgets are rounded
    by largest remainder (ties to lower layers), so the total is exact.

    Args:
        per_layer (`int`): candidates a layer keeps under uniform budgets.
        num_layers (`int`): compressed layers, in order.
        num_candidates (`int`): positions a layer can choose from.
        beta (`float`): `per_layer / min`; PyramidKV's default is 20.

    Returns:
        `list[int]`: each layer's number of candidates, non-increasing, summing to `num_layers * per_layer`.
    """
    if num_layers <= 1:
        return [per_layer] * num_layers
    low = per_layer / beta
    high = 2 * per_layer - low
    if high > num_candidates:
        high = float(num_candidates)
        low = 2 * per_layer - high
    step = (high - low) / (num_layers - 1)
    exact = [high - index * step for index in range(num_layers)]
    budgets = [math.floor(value + 1e-9) for value in exact]
    remainder = num_layers * per_layer - sum(budgets)
    order = sorted(range(num_layers), key=lambda index: (-(exact[index] - budgets[index]), index))
    for index in order[:remainder]:
        budgets[index] += 1
    return [min(budget, num_candidates) for budget in budgets]


@dataclass
class SelectionPolicy:
    """Keeps, in every compressed layer and per KV head, the window, the sinks and the best-scoring candidates.

    For a prompt of `L` tokens, the last token is never stored by the prefill (it is re-computed against the compressed
    cache), so positions `0 .. L - 2` are kept or dropped. Of those, the window (the last `window_size` positions, or
    `window_size - 1` when `window_counts_last_token`, as SnapKV's window includes the last prompt token) is always
    kept, and its rows vote; the positions before it are candidates. The first `num_sink_tokens` real tokens of every
    row are kept as well (counted in the budget). Of the `max_capacity_prompt` positions a layer keeps, what the window
    leaves is filled with the best candidates, per layer as `layer_budgets` says.

    Args:
        max_capacity_prompt (`int`): positions kept per layer and KV head (window and sinks included) under uniform
            budgets; the average under layer-wise ones.
        window_size (`int`, *optional*, defaults to 0): the recent window.
        window_counts_last_token (`bool`, *optional*, defaults to `False`): whether the window includes the last
            prompt token (SnapKV) or lies before it (SpecKV, the paper's code).
        num_sink_tokens (`int`, *optional*, defaults to 0): leading real tokens always kept (StreamingLLM's sinks).
        layer_budgets (`str`, *optional*, defaults to `"uniform"`): `"uniform"`, or `"pyramid"` (PyramidKV: more
            candidates in lower layers, fewer in upper ones, the same total).
        pyramid_beta (`float`, *optional*, defaults to 20): PyramidKV's `beta` (the last layer keeps `1 / beta` of the
            average number of candidates).
    """

    max_capacity_prompt: int
    window_size: int = 0
    window_counts_last_token: bool = False
    num_sink_tokens: int = 0
    layer_budgets: str = "uniform"
    pyramid_beta: float = 20

    @classmethod
    def from_config(cls, config, *, window_counts_last_token: bool = False) -> "SelectionPolicy":
        """The policy a [`KVSelectionConfig`] (or a subclass: `window_size`, `num_sink_tokens` where it has them)
        describes."""
        return cls(
            max_capacity_prompt=config.max_capacity_prompt,
            window_size=getattr(config, "window_size", 0),
            window_counts_last_token=window_counts_last_token,
            num_sink_tokens=getattr(config, "num_sink_tokens", 0),
            layer_budgets=config.layer_budgets,
            pyramid_beta=config.pyramid_beta,
        )

    @property
    def is_uniform(self) -> bool:
        """Whether every compressed layer keeps the same number of rows."""
        return self.layer_budgets == "uniform"

    def window_start(self, prompt_length: int) -> int:
        """The first always-kept position (the window runs to `L - 2`); the candidates are the positions before it."""
        window = self.window_size - 1 if self.window_counts_last_token else self.window_size
        return max(prompt_length - 1 - max(window, 0), 0)

    def candidate_counts(self, prompt_length: int, num_layers: int) -> list[int]:
        """How many candidates each of the `num_layers` compressed layers keeps (in layer order)."""
        window_start = self.window_start(prompt_length)
        per_layer = self.max_capacity_prompt - (prompt_length - 1 - window_start)
        per_layer = max(min(per_layer, window_start), 0)
        if self.is_uniform:
            return [per_layer] * num_layers
        return pyramid_budgets(per_layer, num_layers, window_start, self.pyramid_beta)

    def select(self, scores: torch.Tensor, candidate_valid: torch.Tensor, num_selected: int,
               prompt_length: int) -> torch.Tensor:
        """The kept positions of one layer, `(batch, num_kv_heads, num_selected + window)`, sorted by position.

        Args:
            scores (`torch.Tensor` of shape `(batch, num_kv_heads, num_candidates)`): the scorer's output.
            candidate_valid (`torch.BoolTensor` of shape `(batch, num_candidates)`): False on padding.
            num_selected (`int`): candidates this layer keeps (see [`candidate_counts`]).
            prompt_length (`int`): `L`.
        """
        scores = self.with_sinks(scores, candidate_valid)
        window = torch.arange(self.window_start(prompt_length), prompt_length - 1, device=scores.device)
        return select_kept_positions(scores, candidate_valid, num_selected, window)

    def with_sinks(self, scores: torch.Tensor, candidate_valid: torch.Tensor) -> torch.Tensor:
        """`scores` with the first `num_sink_tokens` real candidates of every row raised above any other."""
        if self.num_sink_tokens == 0:
            return scores
        valid = candidate_valid.to(scores.device).bool()
        sinks = valid & (valid.long().cumsum(-1) <= self.num_sink_tokens)
        return scores.float().masked_fill(sinks[:, None, :], float("inf"))


__all__ = ["LAYER_BUDGETS", "SelectionPolicy", "pyramid_budgets"]
