"""Token scorers: how a prompt compressor ranks the tokens of a prompt (the prompt side's public contract).

A prompt compressor ([`SpecPCPreprocessor`]) is a **token scorer** (this module: one score per prompt token, higher
keeps) plus a **token selector** (`selectors.py`: which tokens to keep under the budget, and with which neighbours).
SpecPC, SpecPrefill and the draft-free controls are compositions of them; a new method is one scorer (or selector)
passed to `SpecPCPreprocessor(..., token_scorer=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..kernels.select import pool_scores
from ..modeling.capture import AttentionObserver, layer_index, observing
from ..modeling.draft import generate_lookahead


@dataclass
class TokenScores:
    """What a [`TokenScorer`] returns for a batch.

    Args:
        scores (`torch.Tensor` of shape `(batch, length)`): one score per prompt position (padding is ignored).
        draft_tokens (`torch.LongTensor` of shape `(batch, n)`): the draft's tokens, if it wrote any (SpecKV-PC reuses
            them); `(batch, 0)` otherwise.
        draft_tokens_valid (`torch.BoolTensor` of shape `(batch, n)`): False after a row's end of sequence.
    """

    scores: torch.Tensor
    draft_tokens: torch.Tensor
    draft_tokens_valid: torch.Tensor

    @classmethod
    def without_draft(cls, scores: torch.Tensor) -> "TokenScores":
        empty = torch.zeros(scores.shape[0], 0, dtype=torch.long, device=scores.device)
        return cls(scores, empty, empty.bool())


class TokenScorer:
    """Base class of the token scorers: one method, [`score`].

    Attributes:
        needs_draft (`bool`): whether [`score`] runs the draft (a compressor then needs one, and checks the prompt's
            ids against it before any work).

    Example (the recency control, the whole of it):

    ```python
    >>> class Recency(TokenScorer):
    ...     def score(self, draft, input_ids, attention_mask, config):
    ...         return TokenScores.without_draft(torch.arange(input_ids.shape[1]).float().expand_as(input_ids))
    ```
    """

    needs_draft: bool = False

    def score(self, draft, input_ids: torch.Tensor, attention_mask: torch.Tensor, config) -> TokenScores:
        """Scores every position of a left-padded batch.

        Args:
            draft (`PreTrainedModel` or `None`): the compressor's draft.
            input_ids (`torch.LongTensor` of shape `(batch, length)`): the checked prompt, left-padded.
            attention_mask (`torch.Tensor` of shape `(batch, length)`): its padding mask.
            config ([`SpecPCConfig`]): the compressor's knobs (read at every call, so edits apply).
        """
        raise NotImplementedError


class _WindowVotes(AttentionObserver):
    """SpecPC's votes: per draft forward, the weighted attention of the last `window` prompt queries (prefill) or of
    the newest token (decode steps), max over layers from `starting_layer_index`, heads and queries."""

    def __init__(self, config, attention_mask: torch.Tensor):
        self.config = config
        self.prompt_mask = attention_mask.bool()
        self.prompt_length = attention_mask.shape[1]
        self.window = min(config.window_size, self.prompt_length)
        self.prefill = None  # (B, L) max over layers of the window queries' weighted attention
        self.decode_steps: dict[int, torch.Tensor] = {}  # lookahead token index -> (B, L)

    def score_layer(self, module, query, key, value, scaling) -> None:
        layer_idx = layer_index(module)
        if layer_idx < self.config.starting_layer_index:
            return
        length, num_keys = self.prompt_length, key.shape[2]
        mask = self.prompt_mask.to(key.device)
        scaling = scaling or query.shape[-1] ** -0.5
        if num_keys == query.shape[2]:  # the prefill forward
            start = length - self.window
            weights = None
            if self.config.weighted_query and self.window > 1:
                weights = torch.linspace(0, 1, self.window, device=key.device)
            votes = kernels.window_scores(
                query[:, :, start:, :], key, scaling=scaling, query_offset=start, key_valid=mask,
                query_valid=mask[:, start:], reduction="max", query_weights=weights,
                implementation=self.config.scoring_implementation,
            )
            self.prefill = _running_max(self.prefill, votes.amax(1)[:, :length])
        else:  # a decode step: one new query, the previous lookahead token
            key_valid = torch.cat([mask, torch.ones(mask.shape[0], num_keys - length, dtype=torch.bool,
                                                    device=key.device)], dim=1)
            votes = kernels.window_scores(
                query, key, scaling=scaling, query_offset=num_keys - query.shape[2], key_valid=key_valid,
                reduction="max", implementation=self.config.scoring_implementation,
            )
            step = num_keys - length - 1
            self.decode_steps[step] = _running_max(self.decode_steps.get(step), votes.amax(1)[:, :length])

    def combine(self, lookahead_valid: torch.Tensor) -> torch.Tensor:
        scores = self.prefill
        for step, votes in self.decode_steps.items():
            voted = lookahead_valid[:, step].to(votes.device)[:, None]  # tokens after a row's EOS do not vote
            scores = torch.maximum(scores, votes * voted)
        return scores.masked_fill(~self.prompt_mask.to(scores.device), 0.0)


def _running_max(current, new):
    return new.float() if current is None else torch.maximum(current, new.float())


def _never_reached() -> ValueError:
    return ValueError(
        "The draft's attention never reached hf_specapprox's scoring wrapper; the draft must use transformers' "
        "`AttentionInterface` (all current transformers text models do)."
    )


class DraftWindowAttention(TokenScorer):
    """SpecPC's scorer (paper §3.1): the draft reads the prompt (and writes `config.lookahead_tokens` tokens with
    stock `draft.generate`); in every layer from `config.starting_layer_index` on, the attention of the last
    `config.window_size` prompt queries (weighted 0 → 1 with `weighted_query`) and of each written token scores
    every prompt token, max over layers, heads and queries."""

    needs_draft = True

    def score(self, draft, input_ids, attention_mask, config) -> TokenScores:
        votes = _WindowVotes(config, attention_mask)
        with observing(draft, votes):
            draft_tokens, draft_valid = generate_lookahead(
                draft, input_ids, attention_mask, config.lookahead_tokens, deduplicate=False,
                decoding=config.lookahead_decoding,
            )
        if votes.prefill is None:
            raise _never_reached()
        return TokenScores(votes.combine(draft_valid).to(input_ids.device), draft_tokens, draft_valid)


class _LookaheadVotes(AttentionObserver):
    """SpecPrefill's scores: per draft forward (the last prompt token's, then each lookahead token's), every layer's
    and head's attention of that one query over the prompt keys only (softmax over the prompt), average-pooled along
    the prompt, max over layers and heads; the forwards are then averaged."""

    def __init__(self, attention_mask: torch.Tensor, pool_kernel_size: int):
        self.prompt_mask = attention_mask.bool()
        self.prompt_length = attention_mask.shape[1]
        self.pool_kernel_size = pool_kernel_size
        self.steps: dict[int, torch.Tensor] = {}  # forward index (0: the prompt's last token) -> (B, L)

    def score_layer(self, module, query, key, value, scaling) -> None:
        length = self.prompt_length
        mask = self.prompt_mask.to(key.device)
        keys = key[:, :, :length].float()
        groups = query.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(groups, dim=1)  # (B, H, L, d)
        last_query = query[:, :, -1:, :].float()  # the forward's newest token
        logits = (last_query @ keys.transpose(-1, -2))[:, :, 0, :] * (scaling or query.shape[-1] ** -0.5)
        probs = torch.softmax(logits.masked_fill(~mask[:, None, :], float("-inf")), dim=-1)  # (B, H, L)
        pooled = pool_scores(probs, self.pool_kernel_size, "mean")
        step = key.shape[2] - length
        votes = pooled.amax(1)
        current = self.steps.get(step)
        self.steps[step] = votes if current is None else torch.maximum(current, votes)

    def combine(self, lookahead_valid: torch.Tensor) -> torch.Tensor:
        total = self.steps[0].clone()
        count = torch.ones_like(total[:, :1])
        for step, votes in self.steps.items():
            if step == 0:
                continue
            # the query of lookahead token `step` ran only if no EOS came before it (lookahead_valid[:, step])
            voted = lookahead_valid[:, step].to(votes.device)[:, None].float()
            total = total + votes * voted
            count = count + voted
        return (total / count).masked_fill(~self.prompt_mask.to(total.device), 0.0)


@dataclass
class DraftLookaheadAttention(TokenScorer):
    """SpecPrefill's scorer (Liu et al., 2025, `look_ahead_spec_worker.py`): the draft writes `lookahead_tokens - 1`
    tokens; each of its `lookahead_tokens` forwards' newest query attends over the prompt keys only, each layer's
    and head's attention is average-pooled (`pool_kernel_size`), max over layers and heads, mean over forwards.

    Args:
        lookahead_tokens (`int`, *optional*, defaults to 8): voting forwards (SpecPrefill's `look_ahead_cnt`).
        pool_kernel_size (`int`, *optional*, defaults to 13): the average pooling's width (odd).
    """

    lookahead_tokens: int = 8
    pool_kernel_size: int = 13
    needs_draft = True

    def score(self, draft, input_ids, attention_mask, config) -> TokenScores:
        votes = _LookaheadVotes(attention_mask, self.pool_kernel_size)
        with observing(draft, votes):
            draft_tokens, draft_valid = generate_lookahead(
                draft, input_ids, attention_mask, self.lookahead_tokens, deduplicate=False,
                decoding=config.lookahead_decoding,
            )
        if 0 not in votes.steps:
            raise _never_reached()
        return TokenScores(votes.combine(draft_valid).to(input_ids.device), draft_tokens, draft_valid)


class RecencyTokenScores(TokenScorer):
    """Later positions score higher: the "just truncate" control (no draft)."""

    def score(self, draft, input_ids, attention_mask, config) -> TokenScores:
        return TokenScores.without_draft(
            torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.float32).expand_as(input_ids))


@dataclass
class RandomTokenScores(TokenScorer):
    """Uniformly random scores from a seeded generator (no draft).

    Args:
        seed (`int`, *optional*, defaults to 0): the generator's seed (the same prompt gets the same choice).
    """

    seed: int = 0

    def score(self, draft, input_ids, attention_mask, config) -> TokenScores:
        generator = torch.Generator().manual_seed(self.seed)
        return TokenScores.without_draft(torch.rand(input_ids.shape, generator=generator).to(input_ids.device))


__all__ = ["DraftLookaheadAttention", "DraftWindowAttention", "RandomTokenScores", "RecencyTokenScores", "TokenScorer",
           "TokenScores"]
