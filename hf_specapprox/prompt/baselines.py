"""Prompt-compression baselines through SpecPC's code path: SpecPrefill (as its own code does it) and two draft-free
controls (recency, random)."""

from __future__ import annotations

import torch
import transformers

from .. import compat
from ..config import SpecPCConfig
from .scorers import DraftLookaheadAttention, RandomTokenScores, RecencyTokenScores
from .selectors import NeighbourExpansion, WholeChunks
from .specpc import SpecPCPreprocessor


def generate_advances_position_ids() -> bool:
    """Whether this transformers version's `generate` carries caller-given `position_ids` through decoding (see
    `compat.GENERATE_ADVANCES_POSITION_IDS`)."""
    return compat.GENERATE_ADVANCES_POSITION_IDS


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
        lookahead_decoding (`str`, *optional*, defaults to `"argmax"`): how the draft writes its tokens. SpecPrefill's
            own code runs the draft on vLLM, which applies no Hugging Face generation config: the bare argmax
            (`"argmax"`, the default). `"generation_config"` applies the draft checkpoint's processors (Qwen2.5's
            repetition penalty), as `draft.generate` would (the harness's `specprefill+genconfig`).
        tokenizer (*optional*): for [`SpecPCPreprocessor.compress_text`].
        **protect: `num_sink_tokens`, `protected_token_ids`, as in [`SpecPCConfig`].
    """

    def __init__(self, draft, max_capacity_prompt: int = 1024, chunk_size: int = 32, tokenizer=None, *,
                 lookahead_tokens: int = 8, pool_kernel_size: int = 13, keep_original_positions: bool = True,
                 lookahead_decoding: str = "argmax", **protect):
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
        super().__init__(draft, config=config, tokenizer=tokenizer,
                         token_scorer=DraftLookaheadAttention(lookahead_tokens, pool_kernel_size),
                         token_selector=WholeChunks(chunk_size))
        self.keep_original_positions = keep_original_positions

    @property
    def chunk_size(self) -> int:
        """Tokens per chunk."""
        return self.token_selector.chunk_size

    @property
    def pool_kernel_size(self) -> int:
        """The average pooling's width."""
        return self.token_scorer.pool_kernel_size

    def __call__(self, input_ids, attention_mask=None, protected_mask=None):
        output = super().__call__(input_ids, attention_mask, protected_mask)
        if self.keep_original_positions:
            positions = torch.zeros_like(output.input_ids)
            for row, kept in enumerate(output.kept_indices):
                if len(kept):
                    positions[row, positions.shape[1] - len(kept):] = kept.to(positions.device)
            output.position_ids = positions
        return output


def _control_config(max_capacity_prompt: int, window_size: int, protect: dict) -> SpecPCConfig:
    """SpecPC's selection with no pooling and no neighbours: the controls keep exactly their best-scoring tokens."""
    return SpecPCConfig(max_capacity_prompt=max_capacity_prompt, window_size=window_size, kernel_size=1,
                        neighbor_tokens=1, starting_layer_index=0, **protect)


class RecencyPreprocessor(SpecPCPreprocessor):
    """Keeps the last `max_capacity_prompt` tokens (plus protected ones): the "just truncate" control, SpecPC's
    selection over [`RecencyTokenScores`]."""

    def __init__(self, max_capacity_prompt: int = 1024, tokenizer=None, **protect):
        super().__init__(None, config=_control_config(max_capacity_prompt, 1, protect), tokenizer=tokenizer,
                         token_scorer=RecencyTokenScores(), token_selector=NeighbourExpansion())


class RandomPreprocessor(SpecPCPreprocessor):
    """Keeps the last `window_size` tokens and a uniformly random choice of the others (seeded): SpecPC's selection
    over [`RandomTokenScores`]."""

    def __init__(self, max_capacity_prompt: int = 1024, window_size: int = 64, seed: int = 0, tokenizer=None,
                 **protect):
        super().__init__(None, config=_control_config(max_capacity_prompt, window_size, protect), tokenizer=tokenizer,
                         token_scorer=RandomTokenScores(seed), token_selector=NeighbourExpansion())

    @property
    def seed(self) -> int:
        return self.token_scorer.seed
