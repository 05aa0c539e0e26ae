"""The public scorer contract of the KV-compressing caches, and the scorers SpecKV, SnapKV and StreamingLLM use.

A compressing cache is a composition (see [`KVCompressionCache`]):

* a **query source** appends tokens after the prompt for the scoring forward (SpecKV: the draft's answer preview,
  [`~hf_specapprox.kv.query_sources.DraftPreview`]; SnapKV: nothing);
* a **scorer** ([`KVScorer`]) turns one full-attention layer's post-RoPE queries and keys into one score per
  candidate prompt position and KV head;
* a **selection policy** ([`~hf_specapprox.kv.policies.SelectionPolicy`]) keeps the always-kept window and sinks and
  the best candidates of each KV head, under a per-layer budget.

A scorer only answers "how good is each candidate key?": padding, ties, the window, sinks, budgets and the kept rows'
bookkeeping are the policy's and the cache's job. Writing a new method is one file with a scorer, its config and a
cache class naming both (`hf_specapprox/kv/knorm.py` is the example), plus one line in `hf_specapprox/integrations/registry.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels


@dataclass
class ScorerInputs:
    """What a [`KVScorer`] sees of one full-attention layer during the compressing prefill.

    The sequence is the left-padded prompt of `L` tokens followed by the query source's tokens (the draft preview
    for SpecKV, nothing for SnapKV). Candidates are the positions `0 .. num_candidates - 1`, the prompt positions
    before the always-kept window.

    Args:
        layer_idx (`int`): the layer's index in the model.
        queries (`torch.Tensor` of shape `(batch, num_heads, num_votes, head_dim)`): post-RoPE (post q-norm) queries of
            the voting rows: the always-kept window, the last prompt token and every appended token, i.e. the rows
            from `query_offset` to the end of the sequence.
        keys (`torch.Tensor` of shape `(batch, num_kv_heads, num_keys, head_dim)`): post-RoPE keys of every position.
        values (`torch.Tensor` of shape `(batch, num_kv_heads, num_keys, head_dim)`): the layer's values.
        scaling (`float`): the attention's softmax scale.
        query_offset (`int`): the sequence index of the first voting row (query `i` sees keys `<= query_offset + i`).
        key_valid (`torch.BoolTensor` of shape `(batch, num_keys)`): False on padding.
        query_valid (`torch.BoolTensor` of shape `(batch, num_votes)`): False on padding and on appended tokens after
            a row's end of sequence; such rows must not vote.
        num_candidates (`int`): how many leading positions are candidates.
        module (`torch.nn.Module`): the attention module (its config, head counts, ...).
    """

    layer_idx: int
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float
    query_offset: int
    key_valid: torch.Tensor
    query_valid: torch.Tensor
    num_candidates: int
    module: torch.nn.Module | None = None

    @property
    def candidate_keys(self) -> torch.Tensor:
        """`keys[:, :, :num_candidates]`."""
        return self.keys[:, :, : self.num_candidates]

    @property
    def candidate_valid(self) -> torch.Tensor:
        """`key_valid[:, :num_candidates]`."""
        return self.key_valid[:, : self.num_candidates]


class KVScorer:
    """Base class of the scorers: one method, [`score`].

    Example (kvpress's KnormPress, the whole of `hf_specapprox/kv/knorm.py`'s scorer):

    ```python
    >>> class KeyNormScorer(KVScorer):
    ...     def score(self, inputs):
    ...         return -inputs.candidate_keys.float().norm(dim=-1)
    ```
    """

    def score(self, inputs: ScorerInputs) -> torch.Tensor:
        """Scores the candidates of one layer.

        Args:
            inputs ([`ScorerInputs`]): the layer's queries, keys, values and masks.

        Returns:
            `torch.Tensor` of shape `(batch, num_kv_heads, num_candidates)`: higher keeps. Scores of padding positions
            are ignored (the policy never prefers padding to a real token); equal scores are taken in position order.
        """
        raise NotImplementedError

    def __call__(self, inputs: ScorerInputs) -> torch.Tensor:
        scores = self.score(inputs)
        expected = (inputs.keys.shape[0], inputs.keys.shape[1], inputs.num_candidates)
        if tuple(scores.shape) != expected:
            raise ValueError(
                f"{type(self).__name__}.score returned shape {tuple(scores.shape)}; a scorer returns one score per "
                f"(batch row, KV head, candidate): {expected}."
            )
        return scores


@dataclass
class AttentionScorer(KVScorer):
    """The attention the voting rows pay to each candidate key (SpecKV, SnapKV; paper §2.1).

    Every voting row gets a real softmax over all the keys it may see (causal, padding removed, fp32); the
    probabilities are reduced over the voting rows and the query heads that share a KV head (`reduction`), then
    pooled along the keys (`kernel_size`, `pool_type`; max-pool pads with -inf, average pool with zeros).

    Args:
        reduction (`str`, *optional*, defaults to `"max"`): `"max"` (SpecKV) or `"mean"` (SnapKV's sum, ranked alike).
        kernel_size (`int`, *optional*, defaults to 7): odd pooling width; 1 disables pooling.
        pool_type (`str`, *optional*, defaults to `"max"`): `"max"` or `"mean"`.
        implementation (`str`, *optional*, defaults to `"auto"`): see `hf_specapprox.kernels.window_scores`.
    """

    reduction: str = "max"
    kernel_size: int = 7
    pool_type: str = "max"
    implementation: str = "auto"

    @classmethod
    def from_config(cls, config) -> "AttentionScorer":
        """The scorer an [`AttentionSelectionConfig`] describes."""
        return cls(reduction=config.reduction_type, kernel_size=config.kernel_size, pool_type=config.pool_type,
                   implementation=config.scoring_implementation)

    def score(self, inputs: ScorerInputs) -> torch.Tensor:
        scores = kernels.window_scores(
            inputs.queries, inputs.keys, scaling=inputs.scaling, query_offset=inputs.query_offset,
            key_valid=inputs.key_valid, query_valid=inputs.query_valid, reduction=self.reduction,
            implementation=self.implementation,
        )
        return kernels.pool_scores(scores[..., : inputs.num_candidates], self.kernel_size, self.pool_type)


class RecencyScorer(KVScorer):
    """Later positions score higher (StreamingLLM's recent tokens; its sinks are the policy's `num_sink_tokens`)."""

    def score(self, inputs: ScorerInputs) -> torch.Tensor:
        batch, num_kv_heads = inputs.keys.shape[:2]
        recency = torch.arange(inputs.num_candidates, device=inputs.keys.device, dtype=torch.float32)
        return recency.expand(batch, num_kv_heads, -1)


__all__ = ["AttentionScorer", "KVScorer", "RecencyScorer", "ScorerInputs"]
