"""A `LogitsProcessor` that measures how far the target's answer follows the draft's preview; it never changes scores."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class DraftAgreementMonitor(LogitsProcessor):
    """Records, per sequence, how often the target's chosen tokens equal the draft's lookahead tokens.

    Pass it in `logits_processor=` to `generate`. It returns the scores unchanged and keeps every count on the device
    (no host synchronisation per step). Position `t` of the answer is compared with draft token `t` while the draft
    has tokens there (up to and including its EOS). High agreement means the draft foresaw the answer the KV cache
    was selected for — a cheap per-response confidence signal.

    Args:
        source: where the draft tokens come from — a [`SpecKVCache`] (its lookahead, read after the prefill) or a
            `(batch, n)` tensor of draft tokens (e.g. `SpecPCOutput.draft_tokens`).
        draft_tokens_valid (`torch.BoolTensor` of shape `(batch, n)`, *optional*): False after a row's EOS, when
            `source` is a tensor.

    Example:

    ```python
    >>> monitor = DraftAgreementMonitor(cache)
    >>> out = target.generate(**inputs, past_key_values=cache, logits_processor=[monitor])
    >>> monitor.agreement(out.sequences)       # (batch,) fraction of compared tokens that agree
    >>> monitor.matched_prefix(out.sequences)  # (batch,) answer tokens equal to the draft's before the first miss
    ```
    """

    def __init__(self, source, draft_tokens_valid: torch.Tensor | None = None):
        self.source = source
        self.draft_tokens_valid = draft_tokens_valid
        self.reset()

    def reset(self) -> None:
        """Forgets what was recorded (call it before reusing the monitor for another `generate`)."""
        self.prompt_length = None
        self._draft = None
        self._unavailable = None
        self._matches = self._compared = self._prefix = self._still_matching = None

    def _draft_tokens(self, batch: int, device):
        if self._draft is None:
            if isinstance(self.source, torch.Tensor):
                tokens = self.source
                valid = self.draft_tokens_valid if self.draft_tokens_valid is not None else torch.ones_like(tokens, dtype=torch.bool)
            else:
                tokens, valid = self.source.lookahead_ids, self.source.lookahead_valid
                if tokens is None:
                    return None
            if batch % tokens.shape[0]:
                raise ValueError(f"{tokens.shape[0]} rows of draft tokens cannot serve a batch of {batch}.")
            repeats = batch // tokens.shape[0]
            self._draft = (tokens.to(device).repeat_interleave(repeats, 0), valid.to(device).bool().repeat_interleave(repeats, 0))
        return self._draft

    def _record(self, input_ids: torch.Tensor, upto: int) -> None:
        """Compares the answer tokens at positions `[already recorded, upto)`."""
        draft = self._draft_tokens(input_ids.shape[0], input_ids.device)
        if draft is None:  # never raise inside `generate`: report it when the numbers are asked for
            self._unavailable = (
                "The cache has no draft tokens: its prompt was not compressed (it fit the budget), so there is "
                "nothing to compare with."
            )
            return
        tokens, valid = draft
        if self._matches is None:
            zeros = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
            self._matches, self._compared, self._prefix = zeros.clone(), zeros.clone(), zeros.clone()
            self._still_matching = torch.ones_like(zeros, dtype=torch.bool)
            self._recorded = 0
        for step in range(self._recorded, min(upto, tokens.shape[1])):
            target = input_ids[:, self.prompt_length + step]
            counted = valid[:, step]
            equal = (target == tokens[:, step]) & counted
            self._matches += equal.long()
            self._compared += counted.long()
            self._still_matching &= equal | ~counted
            self._prefix += (self._still_matching & counted).long()
        self._recorded = max(self._recorded, upto)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        self._record(input_ids, input_ids.shape[1] - self.prompt_length)
        return scores

    def _finalise(self, sequences: torch.Tensor | None) -> None:
        if self.prompt_length is None:
            raise ValueError("Nothing was recorded: pass the monitor to `generate(logits_processor=[...])` first.")
        if self._unavailable:
            raise ValueError(self._unavailable)
        if sequences is not None:  # the last answer token is chosen after the last processor call
            self._record(sequences, sequences.shape[1] - self.prompt_length)

    def agreement(self, sequences: torch.Tensor | None = None) -> torch.Tensor:
        """Fraction of compared answer positions whose token equals the draft's, per sequence (`nan` if none).

        Args:
            sequences (`torch.LongTensor`, *optional*): `generate`'s output, to include the final token.
        """
        self._finalise(sequences)
        return self._matches.float() / self._compared.float()

    def matched_prefix(self, sequences: torch.Tensor | None = None) -> torch.Tensor:
        """Number of leading answer tokens equal to the draft's, per sequence."""
        self._finalise(sequences)
        return self._prefix.clone()
