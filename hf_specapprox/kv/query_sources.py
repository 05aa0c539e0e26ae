"""Query sources: the tokens a compressing cache appends after the prompt for its scoring forward.

Their queries vote (with the prompt's window) for the prompt keys a layer keeps; their own keys and values are never
stored. SnapKV and StreamingLLM append nothing ([`QuerySource`]); SpecKV appends the draft's preview of the answer
([`DraftPreview`]). A query source is independent of the scorer: any scorer can be combined with any source.
"""

from __future__ import annotations

import copy

import torch

from ..modeling.adapters import unwrap_adapters
from ..modeling.distributed import computed_on_first_rank
from ..modeling.draft import check_draft_compatible, check_lookahead_ids, generate_lookahead


class QuerySource:
    """Appends nothing: only the prompt's own rows vote.

    Subclasses override [`tokens`] and [`max_tokens`], and may check the target ([`validate_model`]) and the prompt
    ([`validate_prompt`]) before any work.
    """

    def tokens(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config):
        """The appended tokens `(ids, valid)`, both `(batch, n)`; `valid` is False after a row's end of sequence.

        Args:
            model (`PreTrainedModel`): the target.
            input_ids (`torch.LongTensor` of shape `(batch, L)`): the left-padded prompt.
            attention_mask (`torch.Tensor` of shape `(batch, L)`): its padding mask.
            config: the cache's configuration (read at every prefill, so edits apply).
        """
        empty = input_ids.new_zeros((input_ids.shape[0], 0))
        return empty, empty.bool()

    def max_tokens(self, config) -> int:
        """The most tokens [`tokens`] can append (decides, before any work, whether the prefill goes sparse)."""
        return 0

    def validate_model(self, model) -> None:
        """Raises if this source cannot serve the target `model` (before any work)."""

    def validate_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Raises if this source cannot serve this prompt (before any work)."""

    def tokens_after_context(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config, context):
        """[`tokens`] for a prompt whose first `context.length` positions a retained context holds
        (`hf_specapprox.kv.context.ContextPrefix`): a source that runs a model may continue from the context's keys
        and values. The default ignores them (same tokens, no saving)."""
        return self.tokens(model, input_ids, attention_mask, config)

    def __deepcopy__(self, memo):
        # A source is behaviour: a copy of a cache shares its models (the draft) and precomputed tensors, and gets
        # its own attribute record.
        return copy.copy(self)


class DraftPreview(QuerySource):
    """SpecKV's query source (paper §2.1): the draft's answer preview, as `draft.generate(do_sample=False)` writes it
    (`config.lookahead_tokens` tokens, `config.lookahead_decoding`), or tokens computed beforehand.

    Args:
        draft (`PreTrainedModel`, *optional*): the draft; it must share the target's tokenizer.
        lookahead_ids (`torch.LongTensor` of shape `(batch, n)`, *optional*): draft tokens computed beforehand
            (SpecKV-PC reuses SpecPC's). They belong to the first prompt this source serves; another prompt is
            previewed by the draft, or refused without one. Rows are repeated when the batch is expanded.
        lookahead_valid (`torch.BoolTensor` of shape `(batch, n)`, *optional*): False after a row's EOS; defaults to
            all True.
    """

    def __init__(self, draft=None, lookahead_ids: torch.Tensor | None = None,
                 lookahead_valid: torch.Tensor | None = None):
        if draft is None and lookahead_ids is None:
            raise ValueError(
                "SpecKVCache needs a `draft` model (or precomputed `lookahead_ids`); use SnapKVCache for draft-free "
                "compression."
            )
        if lookahead_ids is not None and lookahead_ids.dim() != 2:
            raise ValueError(f"`lookahead_ids` must be (batch, n), got shape {tuple(lookahead_ids.shape)}.")
        self.draft = None if draft is None else unwrap_adapters(draft, role="draft")
        self.fixed = None
        self._fixed_prompt = None  # the prompt the fixed tokens belong to (the first one served)
        if lookahead_ids is not None:
            valid = torch.ones_like(lookahead_ids, dtype=torch.bool) if lookahead_valid is None else lookahead_valid
            self.fixed = (lookahead_ids, valid.bool())

    def validate_model(self, model) -> None:
        if self.draft is not None:
            check_draft_compatible(self.draft, model)
        if self.fixed is not None:
            check_lookahead_ids(model, self.fixed[0])

    def _uses_fixed(self, input_ids, attention_mask) -> bool:
        """Fixed tokens belong to one prompt: the first one served. Another prompt uses the draft, or is refused
        when there is none."""
        if self.fixed is None:
            return False
        prompt = input_ids.masked_fill(~attention_mask.bool(), -1)
        if self._fixed_prompt is None:
            self._fixed_prompt = prompt
            return True
        same = prompt.shape == self._fixed_prompt.shape and torch.equal(prompt, self._fixed_prompt.to(prompt.device))
        if not same and self.draft is None:
            raise ValueError(
                "This SpecKVCache was given fixed `lookahead_ids` for one prompt and has no draft, so it cannot "
                "compress another prompt (the draft tokens would belong to the wrong prompt). Build a new cache for "
                "each prompt (`SpecKVPC` does), or give the cache a `draft=` to preview new prompts with."
            )
        return same

    def validate_prompt(self, input_ids, attention_mask) -> None:
        if self._uses_fixed(input_ids, attention_mask):
            ids, _ = self.fixed
            if input_ids.shape[0] % ids.shape[0]:
                raise ValueError(
                    f"`lookahead_ids` has {ids.shape[0]} rows but the prompt batch has {input_ids.shape[0]}; give one "
                    "row per prompt."
                )

    def max_tokens(self, config) -> int:
        fixed = 0 if self.fixed is None else self.fixed[0].shape[1]
        return max(fixed, config.lookahead_tokens if self.draft is not None else 0)

    def tokens_after_context(self, model, input_ids, attention_mask, config, context):
        """The draft continues from the retained context's draft keys and values (when the context was prefilled with
        this draft) over the prompt's new positions, then previews the answer: the same tokens as [`tokens`]."""
        uses_fixed = self.fixed is not None and self._uses_fixed(input_ids, attention_mask)
        if uses_fixed or not context.context.drafted_by(self.draft):
            return self.tokens(model, input_ids, attention_mask, config)
        return computed_on_first_rank(
            model, lambda: generate_lookahead(self.draft, input_ids, attention_mask, config.lookahead_tokens,
                                              decoding=config.lookahead_decoding,
                                              past_key_values=context.draft_cache(self.draft.device)),
            input_ids.device,
        )

    def tokens(self, model, input_ids, attention_mask, config):
        if self.fixed is None or not self._uses_fixed(input_ids, attention_mask):
            # A tensor-parallel target: the first rank of its group drafts, the others receive the same tokens.
            return computed_on_first_rank(
                model, lambda: generate_lookahead(self.draft, input_ids, attention_mask, config.lookahead_tokens,
                                                  decoding=config.lookahead_decoding),
                input_ids.device,
            )
        ids, valid = self.fixed
        repeats = input_ids.shape[0] // ids.shape[0]
        return ids.repeat_interleave(repeats, 0), valid.repeat_interleave(repeats, 0)


__all__ = ["DraftPreview", "QuerySource"]
