"""Token selectors: which prompt tokens a prompt compressor keeps, given their scores (the prompt side's public
contract, with the token scorers of `scorers.py`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.select import chunk_keep_mask, specpc_keep_mask


class TokenSelector:
    """Base class of the token selectors: one method, [`select`].

    The compressor protects what must never be dropped (sinks, protected ids, a protected mask) and hands the
    selector that mask; the selector keeps every protected token and fills the budget with the best others.
    """

    def select(self, scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor, config) -> torch.Tensor:
        """The kept positions of a left-padded batch.

        Args:
            scores (`torch.Tensor` of shape `(batch, length)`): the token scorer's output.
            valid (`torch.BoolTensor` of shape `(batch, length)`): False on padding.
            protected (`torch.BoolTensor` of shape `(batch, length)`): always kept.
            config ([`SpecPCConfig`]): the compressor's knobs (budget, window, ...; read at every call).

        Returns:
            `torch.BoolTensor` of shape `(batch, length)`.
        """
        raise NotImplementedError


class NeighbourExpansion(TokenSelector):
    """SpecPC's selection (paper §3.1 steps 3-6): zero-padded pooling of width `config.kernel_size`, the best tokens
    in order, each with its `config.neighbor_tokens` nearest neighbours, the last `config.window_size` tokens always
    kept, cut to `config.max_capacity_prompt`."""

    def select(self, scores, valid, protected, config) -> torch.Tensor:
        return specpc_keep_mask(
            scores, valid, max_capacity_prompt=config.max_capacity_prompt, window_size=config.window_size,
            kernel_size=config.kernel_size, neighbor_tokens=config.resolved_neighbor_tokens,
            pool_type=config.pool_type, protected=protected,
        )


@dataclass
class WholeChunks(TokenSelector):
    """SpecPrefill's selection: chunks of `chunk_size` tokens from each row's first token, ranked by their mean score
    and taken whole, best first, until `config.max_capacity_prompt` tokens; with `keep_last`, every row's last prompt
    token is kept too (SpecPrefill's code does).

    Args:
        chunk_size (`int`, *optional*, defaults to 32): tokens per chunk.
        keep_last (`bool`, *optional*, defaults to `True`): always keep the last prompt token.
    """

    chunk_size: int = 32
    keep_last: bool = True

    def select(self, scores, valid, protected, config) -> torch.Tensor:
        if self.keep_last:
            protected = protected.clone()
            protected[:, -1] = True  # left padding: the last column is every row's last prompt token
        return chunk_keep_mask(scores, valid, max_capacity_prompt=config.max_capacity_prompt,
                               chunk_size=self.chunk_size, protected=protected)


__all__ = ["NeighbourExpansion", "TokenSelector", "WholeChunks"]
