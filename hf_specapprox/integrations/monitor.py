"""A `LogitsProcessor` that measures how far the target's answer follows the draft's preview; it never changes scores."""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor


class DraftAgreementMonitor(LogitsProcessor):
    """Measures, per returned sequence, how often the target's answer tokens equal the draft's lookahead tokens.

    Pass it in `logits_processor=` to `generate`, then give `generate`'s output to [`~DraftAgreementMonitor.agreement`]
    or [`~DraftAgreementMonitor.matched_prefix`]. During generation it returns the scores unchanged and only notes
    where the prompt ends (the shortest input it is called with) and, for a cache, which draft tokens the cache holds;
    no tensor is read or compared per step. The comparison is made afterwards on the returned sequences, so it is
    exact whatever `generate` did in between: greedy or sampling, beam search (beams are reordered between steps),
    `num_return_sequences`, assisted decoding (whose assistant also calls the processors) and streamers.

    The answers start where the prompt the draft tokens continue ends: the cache's prompt (`cache.prompt_length`) for a
    cache, the shortest input `generate` called the monitor with for a tensor (pass `prompt_length=` to `agreement`
    when neither is right, e.g. with an assistant of another tokenizer, whose inputs may be shorter).
    Answer token `t` (position `prompt_length + t` of a returned sequence) is compared with draft token `t` while the
    draft has one (up to and including its EOS) and, if `eos_token_id` is given, while the answer has not ended (up to
    and including its first EOS; the padding `generate` puts after it is not compared). Draft rows serve the
    sequences in order, each an equal run of consecutive sequences, as `generate` expands a batch for beams and
    `num_return_sequences`. High agreement means the draft foresaw the answer the KV cache was selected for — a cheap
    per-response confidence signal.

    Args:
        source: where the draft tokens come from — a [`SpecKVCache`] (its `lookahead_ids`/`lookahead_valid`, as the
            cache holds them during generation) or a `(batch, n)` tensor of draft tokens (e.g.
            `SpecPCOutput.draft_tokens`).
        draft_tokens_valid (`torch.BoolTensor` of shape `(batch, n)`, *optional*): False after a row's EOS, when
            `source` is a tensor (a cache holds its own; this is then ignored).
        eos_token_id (`int` or `list[int]`, *optional*): the target's end-of-sequence id(s); answer positions after
            the first one are not compared. Without it every position of the returned sequence is compared.

    Example:

    ```python
    >>> monitor = DraftAgreementMonitor(cache)
    >>> out = target.generate(**inputs, past_key_values=cache, logits_processor=[monitor])
    >>> monitor.agreement(out)       # (num_sequences,) fraction of compared answer tokens equal to the draft's
    >>> monitor.matched_prefix(out)  # (num_sequences,) answer tokens equal to the draft's before the first miss
    ```
    """

    def __init__(self, source, draft_tokens_valid: torch.Tensor | None = None, *, eos_token_id=None):
        if isinstance(source, torch.Tensor):
            if source.dim() != 2:
                raise ValueError(f"Draft tokens must be (batch, n), got shape {tuple(source.shape)}.")
            if draft_tokens_valid is not None and draft_tokens_valid.shape != source.shape:
                raise ValueError(
                    f"`draft_tokens_valid` must have the shape of the draft tokens {tuple(source.shape)}, got "
                    f"{tuple(draft_tokens_valid.shape)}."
                )
        elif not hasattr(source, "lookahead_ids"):
            raise TypeError(
                "`source` must be a SpecKVCache (or another cache with `lookahead_ids`) or a (batch, n) tensor of "
                f"draft tokens, got {type(source).__name__}."
            )
        self.source = source
        self.draft_tokens_valid = draft_tokens_valid
        self.eos_token_id = _as_id_list(eos_token_id)
        self.reset()

    def reset(self) -> None:
        """Forgets what was recorded (call it before reusing the monitor for another `generate`)."""
        self.prompt_length = None
        self._cache_state = None  # (lookahead_ids, lookahead_valid, prompt_length) of the cache at the last call

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # Shapes and references only: no device work, no host synchronisation. Beam search, assisted decoding (the
        # assistant's `generate` calls the processors too, with longer inputs) and prompt lookup never call it with
        # fewer columns than the prompt has.
        length = input_ids.shape[1]
        if self.prompt_length is None or length < self.prompt_length:
            self.prompt_length = length
        if not isinstance(self.source, torch.Tensor):
            self._cache_state = (
                self.source.lookahead_ids,
                self.source.lookahead_valid,
                getattr(self.source, "prompt_length", None),
            )
        return scores

    def agreement(self, sequences=None, *, prompt_length: int | None = None) -> torch.Tensor:
        """Fraction of compared answer tokens equal to the draft's, per returned sequence (`nan` where none is
        compared).

        Args:
            sequences (`torch.LongTensor` of shape `(num_sequences, length)` or a `generate` output): what `generate`
                returned (its `sequences` when it returned a dict).
            prompt_length (`int`, *optional*): where the answers start; by default the end of the prompt the draft
                tokens continue (the cache's prompt, or the shortest input the monitor saw).
        """
        matches, compared, _ = self._compare(sequences, prompt_length)
        return matches.float() / compared.float()

    def matched_prefix(self, sequences=None, *, prompt_length: int | None = None) -> torch.Tensor:
        """Number of leading answer tokens equal to the draft's, per returned sequence.

        Args:
            sequences (`torch.LongTensor` or `generate`'s output, *optional*): as for
                [`~DraftAgreementMonitor.agreement`].
            prompt_length (`int`, *optional*): as for [`~DraftAgreementMonitor.agreement`].
        """
        return self._compare(sequences, prompt_length)[2]

    # ----------------------------------------------------------------------------------------------------------------
    def _draft_tokens(self):
        if isinstance(self.source, torch.Tensor):
            valid = self.draft_tokens_valid
            return self.source, (torch.ones_like(self.source, dtype=torch.bool) if valid is None else valid), None
        tokens, valid, cache_prompt_length = self._cache_state
        if tokens is None:
            raise ValueError(
                "The cache held no draft tokens while `generate` ran: its prompt was not compressed (it fit the "
                "budget), so there is nothing to compare with."
            )
        if valid is None:
            valid = torch.ones_like(tokens, dtype=torch.bool)
        return tokens, valid, cache_prompt_length if isinstance(cache_prompt_length, int) else None

    def _compare(self, sequences, prompt_length):
        if self.prompt_length is None:
            raise ValueError("Nothing was recorded: pass the monitor to `generate(logits_processor=[...])` first.")
        sequences = getattr(sequences, "sequences", sequences)
        if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
            raise ValueError(
                "Pass what `generate` returned (a (num_sequences, length) tensor, or its output with `.sequences`): "
                "the monitor compares the returned answers with the draft's tokens."
            )
        tokens, valid, cache_prompt_length = self._draft_tokens()
        if prompt_length is None:
            prompt_length = cache_prompt_length if cache_prompt_length is not None else self.prompt_length
        if not 0 <= prompt_length <= sequences.shape[1]:
            raise ValueError(
                f"The sequences have {sequences.shape[1]} columns, fewer than the prompt's {prompt_length}: pass the "
                "sequences of the `generate` call the monitor watched."
            )
        device = sequences.device
        rows = draft_rows_for_sequences(tokens, valid, sequences.shape[0]).to(device)
        tokens, valid = tokens.to(device)[rows], valid.to(device).bool()[rows]
        return compare_with_draft(sequences[:, prompt_length:], tokens, valid, eos_token_id=self.eos_token_id)


def _as_id_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"`eos_token_id` must be an int or a list of ints, got {eos_token_id!r}.")
    return [int(i) for i in ids]


def draft_rows_for_sequences(tokens: torch.Tensor, valid: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Which draft row serves each of `num_sequences` returned sequences: row `floor(s * R / S)` for sequence `s`.

    `generate` expands every prompt into consecutive rows (beams, then `num_return_sequences` of them returned), so with
    `B` prompts the `R` draft rows come in `B` runs of equal rows and the `S` sequences in `B` runs; row
    `floor(s * R / S)` lies in the run of sequence `s`'s prompt. When `R` does not divide `S`, the draft rows must
    indeed repeat in runs of `R / gcd(R, S)`, or which row belongs to which sequence cannot be told.
    """
    num_rows = tokens.shape[0]
    if num_rows == 0 or num_sequences == 0:
        raise ValueError(f"{num_rows} rows of draft tokens cannot serve {num_sequences} sequences.")
    if num_sequences % num_rows:
        run = num_rows // math.gcd(num_rows, num_sequences)
        grouped = num_rows // run
        width = tokens.shape[1]
        same = (tokens.reshape(grouped, run, width) == tokens[::run, None]).all() and (
            valid.reshape(grouped, run, width) == valid[::run, None]
        ).all()
        if not bool(same):
            raise ValueError(
                f"{num_rows} rows of draft tokens cannot serve {num_sequences} sequences: give one row per prompt "
                "(they are repeated for `num_return_sequences`), or the rows `generate` expanded for beam search."
            )
    return torch.arange(num_sequences) * num_rows // num_sequences


def compare_with_draft(answers: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, eos_token_id=()):
    """Compares answers with draft tokens, row by row.

    Args:
        answers (`torch.LongTensor` of shape `(rows, m)`): the answer tokens (the returned sequences after the prompt).
        tokens (`torch.LongTensor` of shape `(rows, n)`): the draft tokens of each row.
        valid (`torch.BoolTensor` of shape `(rows, n)`): False after the draft's EOS.
        eos_token_id (`list[int]`, *optional*): answer positions after the first of these are not compared.

    Returns:
        `(matches, compared, matched_prefix)`, each `(rows,)` long: answer positions equal to the draft's, positions
        compared, and leading compared positions equal to the draft's.
    """
    width = min(answers.shape[1], tokens.shape[1])
    answers, tokens, counted = answers[:, :width], tokens[:, :width], valid[:, :width].bool()
    if len(eos_token_id):
        is_eos = torch.isin(answers, torch.tensor(list(eos_token_id), device=answers.device))
        counted = counted & ((is_eos.long().cumsum(-1) - is_eos.long()) == 0)  # up to and including the first EOS
    equal = (answers == tokens) & counted
    still_matching = (equal | ~counted).long().cumprod(-1).bool()
    return equal.sum(-1), counted.sum(-1), (still_matching & counted).sum(-1)
