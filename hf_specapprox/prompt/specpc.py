"""SpecPC (arXiv 2506.08373 §3.1): the draft's attention picks which prompt tokens the target gets to see."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from ..checks import check_prompt
from ..config import SpecPCConfig, resolve_config, resolve_specpc_kernel_size
from ..modeling.adapters import unwrap_adapters
from ..modeling.draft import check_prompt_ids
from .scorers import DraftWindowAttention, TokenScorer
from .selectors import NeighbourExpansion, TokenSelector


@dataclass
class SpecPCOutput:
    """What [`SpecPCPreprocessor`] returns for a batch.

    Attributes:
        input_ids (`torch.LongTensor` of shape `(batch, kept)`): the compressed prompts, left-padded.
        attention_mask (`torch.LongTensor` of shape `(batch, kept)`): their padding mask.
        kept_indices (`list[torch.LongTensor]`): per row, the kept positions in the row's original (unpadded) tokens,
            increasing.
        draft_tokens (`torch.LongTensor` of shape `(batch, n)`): the draft's greedy tokens (SpecKV-PC reuses them).
        draft_tokens_valid (`torch.BoolTensor` of shape `(batch, n)`): False after a row's EOS.
        token_scores (`torch.FloatTensor` of shape `(batch, length)`): the draft's vote for every input position
            (before pooling; 0 on padding).
        original_lengths (`torch.LongTensor` of shape `(batch,)`): real tokens per input row.
        kept_lengths (`torch.LongTensor` of shape `(batch,)`): real tokens per output row.
        draft_seconds (`float`): wall time of the draft pass.
        position_ids (`torch.LongTensor` of shape `(batch, kept)`, *optional*): original position ids of the kept
            tokens, for methods that keep them (SpecPrefill); `None` when positions are renumbered (SpecPC).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    kept_indices: list
    draft_tokens: torch.Tensor
    draft_tokens_valid: torch.Tensor
    token_scores: torch.Tensor
    original_lengths: torch.Tensor
    kept_lengths: torch.Tensor
    draft_seconds: float
    position_ids: torch.Tensor | None = None

    @property
    def stats(self) -> dict:
        """Plain numbers for logs and JSON: original and kept tokens per row, their ratio, the draft's seconds."""
        return {
            "original_tokens": self.original_lengths.tolist(),
            "kept_tokens": self.kept_lengths.tolist(),
            "compression_ratio": self.compression_ratio.tolist(),
            "draft_seconds": self.draft_seconds,
        }

    @property
    def model_inputs(self) -> dict:
        """`input_ids` and `attention_mask` (and `position_ids` when the method keeps original positions), ready for
        `target.generate(**output.model_inputs)`."""
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs

    @property
    def compression_ratio(self) -> torch.Tensor:
        """Kept over original tokens, per row."""
        return self.kept_lengths.float() / self.original_lengths.clamp(min=1).float()


class SpecPCPreprocessor:
    """Compresses prompts with SpecPC: the draft reads each prompt once and its attention picks the tokens to keep.

    The draft runs one forward over the prompt (or generates `lookahead_tokens` tokens, as `draft.generate` with its
    generation config would; see `lookahead_decoding`). In every draft layer from `starting_layer_index` on, the
    attention of the last `window_size` prompt queries (weighted 0 → 1) is taken, and each prompt token's score is the
    max over layers, heads and queries. The scores are smoothed (zero-padded pooling of width `kernel_size`: by
    default 32 for a Llama-family draft, 64 for Qwen and others, as released; the resolved value is in
    `preprocessor.config.kernel_size`), the best tokens are taken in order with their `neighbor_tokens` nearest
    neighbours, the last `window_size` tokens are always kept, and the result is cut to `max_capacity_prompt` tokens
    and put back in order. The target then sees a shorter prompt with renumbered positions.

    Works on left-padded, ragged batches: every row is compressed on its own and the results are re-padded on the left.

    The preprocessor is a composition (the prompt side's contract, as the KV side's scorer + query source + policy):
    a **token scorer** ([`TokenScorer`], SpecPC's [`DraftWindowAttention`] by default) scores every prompt token, and
    a **token selector** ([`TokenSelector`], SpecPC's [`NeighbourExpansion`] by default) keeps the budget; the
    preprocessor checks the prompt, protects what must never be dropped and re-pads the result. SpecPrefill and the
    draft-free controls are other compositions ([`SpecPrefillPreprocessor`], [`RecencyPreprocessor`],
    [`RandomPreprocessor`]); a method of your own passes its scorer or selector here.

    Args:
        draft (`PreTrainedModel`): the draft model (same tokenizer as the target); `None` for a token scorer that
            needs none.
        config ([`SpecPCConfig`], *optional*): all knobs at once; or pass them as keyword arguments.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): needed only for [`~SpecPCPreprocessor.compress_text`].
        token_scorer ([`TokenScorer`], *optional*): how tokens are scored; defaults to SpecPC's.
        token_selector ([`TokenSelector`], *optional*): how the kept tokens are chosen; defaults to SpecPC's.

    Example:

    ```python
    >>> from hf_specapprox import SpecPCPreprocessor
    >>> specpc = SpecPCPreprocessor(draft=draft, max_capacity_prompt=1024)
    >>> compressed = specpc(inputs["input_ids"], inputs["attention_mask"])
    >>> out = target.generate(**compressed.model_inputs, max_new_tokens=64)
    ```
    """

    def __init__(self, draft, config: SpecPCConfig | None = None, tokenizer=None, *,
                 token_scorer: TokenScorer | None = None, token_selector: TokenSelector | None = None,
                 **config_kwargs):
        self.config = resolve_config(SpecPCConfig, config, config_kwargs)
        self.token_scorer = token_scorer if token_scorer is not None else DraftWindowAttention()
        self.token_selector = token_selector if token_selector is not None else NeighbourExpansion()
        if self.token_scorer.needs_draft:
            if draft is None:
                raise ValueError(
                    f"{type(self).__name__} needs `draft=` (a small model of the target's family); its attention "
                    "picks the tokens. RecencyPreprocessor and RandomPreprocessor are the draft-free controls."
                )
            draft = unwrap_adapters(draft, role="draft")
        elif draft is not None:
            raise ValueError(f"{type(self).__name__} uses no draft ({type(self.token_scorer).__name__} scores the "
                             "tokens); do not pass one.")
        self.draft = draft
        self.tokenizer = tokenizer
        if self.config.kernel_size is None:  # the released per-family value, stored where it can be read and edited
            self.config = replace(self.config, kernel_size=resolve_specpc_kernel_size(draft))
        self._check_config()

    def _check_config(self) -> None:
        """Validates the knobs (again at every call: a config may be edited after construction); a `kernel_size`
        edited back to `None` is resolved again from the draft's family."""
        self.config.validate()
        if self.config.kernel_size is None:
            self.config.kernel_size = resolve_specpc_kernel_size(self.draft)
        if self.draft is None:
            return
        num_layers = getattr(self.draft.config.get_text_config(decoder=True), "num_hidden_layers", None)
        if num_layers is not None and self.config.starting_layer_index >= num_layers:
            raise ValueError(
                f"`starting_layer_index` ({self.config.starting_layer_index}) must be below the draft's number of "
                f"layers ({num_layers}), or no layer votes. Lower it (the paper uses 8 for 16- to 24-layer drafts)."
            )

    def _protected(self, input_ids: torch.Tensor, valid: torch.Tensor, protected_mask) -> torch.Tensor:
        protected = torch.zeros_like(valid)
        if self.config.num_sink_tokens:
            rank = valid.long().cumsum(-1) - 1
            protected |= valid & (rank < self.config.num_sink_tokens)
        protected_ids = self.config.protected_token_ids
        if protected_ids:
            protected |= torch.isin(input_ids, torch.tensor(protected_ids, device=input_ids.device))
        if protected_mask is not None:
            protected |= protected_mask.to(device=input_ids.device, dtype=torch.bool)
        return protected & valid

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask, protected_mask) -> torch.Tensor:
        """Refuses, before any draft work, inputs that cannot be compressed; returns the attention mask."""
        attention_mask = check_prompt(input_ids, attention_mask, type(self).__name__)
        if protected_mask is not None:
            if not isinstance(protected_mask, torch.Tensor) or protected_mask.shape != input_ids.shape:
                shape = tuple(protected_mask.shape) if isinstance(protected_mask, torch.Tensor) else protected_mask
                raise ValueError(
                    f"`protected_mask` must be a tensor with the shape of `input_ids` {tuple(input_ids.shape)}, got "
                    f"{shape}."
                )
            if protected_mask.dtype != torch.bool and not bool(((protected_mask == 0) | (protected_mask == 1)).all()):
                raise ValueError("`protected_mask` must be boolean (True: never drop this position) or hold 0/1.")
        if self.draft is not None:
            check_prompt_ids(self.draft, input_ids, attention_mask)
        return attention_mask

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, protected_mask=None):
        """Compresses a batch of left-padded prompts.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, length)`): prompts, left-padded.
            attention_mask (`torch.LongTensor` of shape `(batch, length)`, *optional*): their padding mask.
            protected_mask (`torch.BoolTensor` of shape `(batch, length)`, *optional*): positions never dropped.

        Returns:
            [`SpecPCOutput`]

        Raises:
            ValueError: before the draft runs, for an empty batch or empty prompts (0 tokens), a row that is all
                padding, right padding or gaps in the mask, a `protected_mask` of another shape, prompt ids the draft
                cannot embed, or knobs made invalid after construction.
            TypeError: before the draft runs, for `protected_token_ids` that are not ints or ids that are not integers.
        """
        self._check_config()
        attention_mask = self._check_inputs(input_ids, attention_mask, protected_mask)
        valid = attention_mask.bool()
        start = time.perf_counter()
        scored = self.token_scorer.score(self.draft, input_ids, attention_mask, self.config)
        draft_seconds = time.perf_counter() - start
        keep = self.token_selector.select(scored.scores, valid, self._protected(input_ids, valid, protected_mask),
                                          self.config)
        return _gather_left_padded(input_ids, valid, keep, scored.draft_tokens, scored.draft_tokens_valid,
                                   scored.scores, draft_seconds, pad_id=_pad_id(self.draft))

    def compress_text(self, text, *, separator: str | None = None, **kwargs):
        """Compresses one string or a list of strings with the tokenizer given at construction.

        Args:
            text (`str` or `list[str]`): the prompt(s).
            separator (`str`, *optional*): for a text people read: put between the runs of kept tokens that are not
                next to each other in the input (e.g. `" … "`), each run decoded on its own, so that no two words are
                glued where tokens were dropped. Leave it `None` for the text to give the target: exactly the kept
                tokens, decoded.
            **kwargs: passed on to the preprocessor's call (`protected_mask`).

        Returns:
            `(texts, output)`: the compressed text of every input (decoded from the kept tokens, special tokens kept)
            and the [`SpecPCOutput`] with the numbers.
        """
        if self.tokenizer is None:
            raise ValueError("`compress_text` needs the `tokenizer=` of the draft, given when building the preprocessor.")
        texts = [text] if isinstance(text, str) else list(text)
        previous_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            encoded = self.tokenizer(texts, return_tensors="pt", padding=True)
        finally:
            self.tokenizer.padding_side = previous_side
        output = self(encoded["input_ids"], encoded["attention_mask"], **kwargs)
        if separator is None:
            decoded = [
                self.tokenizer.decode(row[mask.bool()]) for row, mask in zip(output.input_ids, output.attention_mask)
            ]
        else:
            decoded = [self._readable(encoded["input_ids"][row], encoded["attention_mask"][row], kept, separator)
                       for row, kept in enumerate(output.kept_indices)]
        return (decoded[0] if isinstance(text, str) else decoded), output


    def _readable(self, ids, mask, kept, separator: str) -> str:
        """The kept tokens of one row, each run of neighbours decoded alone, runs joined by `separator`."""
        real = ids[mask.bool()]
        kept = kept.tolist()
        runs, start = [], 0
        for index in range(1, len(kept) + 1):
            if index == len(kept) or kept[index] != kept[index - 1] + 1:
                runs.append(self.tokenizer.decode(real[kept[start:index]]).strip())
                start = index
        prefix = separator.lstrip() if kept and kept[0] > 0 else ""
        suffix = separator.rstrip() if kept and kept[-1] < len(real) - 1 else ""
        return prefix + separator.join(runs) + suffix


def _pad_id(model) -> int:
    if model is None:
        return 0
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad if not isinstance(pad, (list, tuple)) else pad[0])


def _gather_left_padded(input_ids, valid, keep, draft_tokens, draft_valid, scores, draft_seconds, pad_id):
    batch, length = input_ids.shape
    counts = keep.sum(-1)
    width = int(counts.max())
    positions = torch.arange(length, device=input_ids.device).expand(batch, -1)
    ordered = torch.where(keep, positions, torch.full_like(positions, length)).sort(dim=-1).values[:, :width]
    # Row b holds its counts[b] kept positions at the end of the output row: left padding.
    source = torch.arange(width, device=input_ids.device)[None, :] - (width - counts)[:, None]
    out_valid = source >= 0
    gathered = ordered.gather(1, source.clamp(min=0))
    new_ids = torch.where(out_valid, input_ids.gather(1, gathered.clamp(max=length - 1)), torch.full_like(gathered, pad_id))
    first_real = length - valid.sum(-1)
    kept_indices = [ordered[row, : counts[row]] - first_real[row] for row in range(batch)]
    original = valid.sum(-1)
    return SpecPCOutput(
        input_ids=new_ids,
        attention_mask=out_valid.long(),
        kept_indices=kept_indices,
        draft_tokens=draft_tokens,
        draft_tokens_valid=draft_valid,
        token_scores=scores,
        original_lengths=original,
        kept_lengths=counts,
        draft_seconds=draft_seconds,
    )
