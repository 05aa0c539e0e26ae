"""Prompt-compression baselines through SpecPC's code path: SpecPrefill (as its own code does it) and two draft-free
controls (recency, random)."""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
import transformers

from ..modeling.capture import AttentionObserver, observing
from ..config import SpecPCConfig
from ..modeling.draft import generate_lookahead
from ..kernels.select import chunk_keep_mask, pool_scores
from .specpc import SpecPCPreprocessor


def generate_advances_position_ids() -> bool:
    """Whether this transformers version's `generate` carries caller-given `position_ids` through decoding (extends
    them by one per new token). 5.x does (`_update_model_kwargs_for_generation` advances them); 4.56 does not: it
    keeps re-using the prompt's last position, so original positions cannot be given to `generate` there.

    Version seam, decided by reading that method's source (the behaviour has no version flag of its own)."""
    return _generate_advances_position_ids()


@lru_cache(maxsize=1)
def _generate_advances_position_ids() -> bool:
    from transformers import GenerationMixin

    try:
        source = inspect.getsource(GenerationMixin._update_model_kwargs_for_generation)
    except (OSError, TypeError, AttributeError):
        return False
    return "position_ids" in source


class _SpecPrefillVotes(AttentionObserver):
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


class SpecPrefillPreprocessor(SpecPCPreprocessor):
    """SpecPrefill (Liu et al., 2025) as its own code does it (`look_ahead_spec_worker.py`, configs
    `config_p*_full*.yaml`; the SpecPC paper's §5 baseline):

    1. the draft writes `lookahead_tokens - 1` tokens greedily (its generation config applies, as with `generate`),
       so `lookahead_tokens` forwards vote: the last prompt token's and those of the first `lookahead_tokens - 1`
       draft tokens (SpecPrefill's `look_ahead_cnt`, 8; 1 is its last-token-only variant);
    2. each forward's query attends over the prompt keys only (softmax over the prompt); each layer's and head's
       attention is average-pooled along the prompt (kernel `pool_kernel_size`, 13, zero padding), then the max is
       taken over layers and heads, and the mean over the voting forwards;
    3. chunks of `chunk_size` (32) tokens from the row's first token are ranked by their mean score and taken whole,
       best first, until `max_capacity_prompt` tokens (the last chunk taken may be cut; the reference keeps
       `ceil(p * chunks)` whole chunks of a keep ratio `p`); the last prompt token is always kept;
    4. the kept tokens keep their **original position ids** (`output.position_ids`, part of `output.model_inputs`),
       and decoding continues at the original prompt length.

    Carrying position ids through `generate` needs transformers 5.x (`hf_specapprox.prompt.baselines.generate_advances_position_ids`); on 4.56
    `keep_original_positions=True` (the default) is refused at construction. `keep_original_positions=False`
    renumbers the kept tokens contiguously, as SpecPC does (a deviation from SpecPrefill's code).

    Args:
        draft (`PreTrainedModel`): the draft.
        max_capacity_prompt (`int`, *optional*, defaults to 1024): tokens kept.
        chunk_size (`int`, *optional*, defaults to 32): tokens per chunk.
        lookahead_tokens (`int`, *optional*, defaults to 8): voting draft forwards (SpecPrefill's `look_ahead_cnt`).
        pool_kernel_size (`int`, *optional*, defaults to 13): average-pooling width (odd; 1 disables it).
        keep_original_positions (`bool`, *optional*, defaults to `True`): give the target the original positions.
        lookahead_decoding (`str`, *optional*, defaults to `"generation_config"`): as in [`SpecPCConfig`].
        tokenizer (*optional*): for [`SpecPCPreprocessor.compress_text`].
        **protect: `num_sink_tokens`, `protected_token_ids`, as in [`SpecPCConfig`].
    """

    def __init__(self, draft, max_capacity_prompt: int = 1024, chunk_size: int = 32, tokenizer=None, *,
                 lookahead_tokens: int = 8, pool_kernel_size: int = 13, keep_original_positions: bool = True,
                 lookahead_decoding: str = "generation_config", **protect):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"`chunk_size` must be an int >= 1, got {chunk_size!r}.")
        if isinstance(pool_kernel_size, bool) or not isinstance(pool_kernel_size, int) or pool_kernel_size < 1 \
                or pool_kernel_size % 2 == 0:
            raise ValueError(f"`pool_kernel_size` must be an odd int >= 1 (13 in SpecPrefill), got {pool_kernel_size!r}.")
        if not isinstance(keep_original_positions, bool):
            raise TypeError(f"`keep_original_positions` must be True or False, got {keep_original_positions!r}.")
        if keep_original_positions and not generate_advances_position_ids():
            raise NotImplementedError(
                f"SpecPrefill gives the target its kept tokens at their original positions, but transformers "
                f"{transformers.__version__}'s `generate` cannot carry custom `position_ids` through decoding (it "
                "does not advance them per new token; 5.x does). Upgrade transformers, or pass "
                "`keep_original_positions=False` to renumber the kept tokens contiguously (as SpecPC does; a "
                "deviation from SpecPrefill's own code)."
            )
        config = SpecPCConfig(max_capacity_prompt=max_capacity_prompt, window_size=1, weighted_query=False,
                              starting_layer_index=0, kernel_size=1, lookahead_tokens=lookahead_tokens,
                              lookahead_decoding=lookahead_decoding, **protect)
        super().__init__(draft, config=config, tokenizer=tokenizer)
        self.chunk_size = chunk_size
        self.pool_kernel_size = pool_kernel_size
        self.keep_original_positions = keep_original_positions

    def _token_scores(self, input_ids, attention_mask):
        votes = _SpecPrefillVotes(attention_mask, self.pool_kernel_size)
        with observing(self.draft, votes):
            draft_tokens, draft_valid = generate_lookahead(
                self.draft, input_ids, attention_mask, self.config.lookahead_tokens, deduplicate=False,
                decoding=self.config.lookahead_decoding,
            )
        if 0 not in votes.steps:
            raise ValueError(
                "The draft's attention never reached hf_specapprox's scoring wrapper; the draft must use transformers' "
                "`AttentionInterface` (all current transformers text models do)."
            )
        return votes.combine(draft_valid).to(input_ids.device), draft_tokens, draft_valid

    def _select(self, scores, valid, protected):
        last = torch.zeros_like(valid)
        last[:, -1] = True  # left padding: the last column is every row's last prompt token
        return chunk_keep_mask(scores, valid, max_capacity_prompt=self.config.max_capacity_prompt,
                               chunk_size=self.chunk_size, protected=protected | last)

    def __call__(self, input_ids, attention_mask=None, protected_mask=None):
        output = super().__call__(input_ids, attention_mask, protected_mask)
        if self.keep_original_positions:
            positions = torch.zeros_like(output.input_ids)
            for row, kept in enumerate(output.kept_indices):
                if len(kept):
                    positions[row, positions.shape[1] - len(kept):] = kept.to(positions.device)
            output.position_ids = positions
        return output


class _ControlPreprocessor(SpecPCPreprocessor):
    """A control without a draft: scores come from position (recency) or a seeded generator (random); selection,
    protection and output are SpecPC's."""

    _uses_draft = False

    def __init__(self, max_capacity_prompt: int, window_size: int, tokenizer=None, **protect):
        config = SpecPCConfig(max_capacity_prompt=max_capacity_prompt, window_size=window_size, kernel_size=1,
                              neighbor_tokens=1, starting_layer_index=0, **protect)
        super().__init__(None, config=config, tokenizer=tokenizer)

    def _token_scores(self, input_ids, attention_mask):
        empty = input_ids.new_zeros((input_ids.shape[0], 0))
        return self._control_scores(input_ids), empty, empty.bool()

    def _control_scores(self, input_ids):
        raise NotImplementedError


class RecencyPreprocessor(_ControlPreprocessor):
    """Keeps the last `max_capacity_prompt` tokens (plus protected ones): the "just truncate" control."""

    def __init__(self, max_capacity_prompt: int = 1024, tokenizer=None, **protect):
        super().__init__(max_capacity_prompt, window_size=1, tokenizer=tokenizer, **protect)

    def _control_scores(self, input_ids):
        return torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.float32).expand_as(input_ids)


class RandomPreprocessor(_ControlPreprocessor):
    """Keeps the last `window_size` tokens and a uniformly random choice of the others (seeded)."""

    def __init__(self, max_capacity_prompt: int = 1024, window_size: int = 64, seed: int = 0, tokenizer=None,
                 **protect):
        super().__init__(max_capacity_prompt, window_size=window_size, tokenizer=tokenizer, **protect)
        self.seed = seed

    def _control_scores(self, input_ids):
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
