"""Knorm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"; kvpress's
`KnormPress`): keys with a small L2 norm draw attention, so each KV head keeps its smallest-norm prompt keys.

Written only against the public scorer contract (`hf_specapprox.kv.scorers`) and registered with one line in
`hf_specapprox/integrations/registry.py`: that is all a new method needs to appear in the pipeline, the evaluation harness, the
CLI and the test grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .cache import KVCompressionCache
from ..config import KVSelectionConfig
from .scorers import KVScorer, ScorerInputs


@dataclass
class KnormConfig(KVSelectionConfig):
    """Configuration of Knorm: the budget (and the layer-wise budgets) of [`KVSelectionConfig`]. As kvpress's
    `KnormPress`, there is no always-kept window: every prompt position but the last (which is re-computed against
    the compressed cache) competes on its key's norm.

    Args:
        max_capacity_prompt (`int`, *optional*, defaults to 1024): prompt positions kept per layer and KV head.
    """

    method: ClassVar[str] = "knorm"


class KeyNormScorer(KVScorer):
    """Minus the L2 norm of each candidate key (post-RoPE, which rotates pairs of dimensions and keeps the norm)."""

    def score(self, inputs: ScorerInputs) -> torch.Tensor:
        return -inputs.candidate_keys.float().norm(dim=-1)


class KnormCache(KVCompressionCache):
    """A transformers `Cache` that keeps, per full-attention layer and KV head, the `max_capacity_prompt` prompt keys
    with the smallest L2 norm (Knorm; no draft, no queries). Same binding and `generate` support as
    [`SpecKVCache`].

    Args:
        config ([`KnormConfig`], *optional*): all knobs at once.
        model (`PreTrainedModel`, *optional*): the target to bind.
        **config_kwargs: fields of [`KnormConfig`].
    """

    config_class = KnormConfig

    def build_scorer(self) -> KeyNormScorer:
        return KeyNormScorer()
