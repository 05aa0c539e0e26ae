"""What a compressing cache knows of the prompt it holds: data only, next to its layers.

The record is what lets one cache object serve many `generate` calls exactly: the ids it has consumed (to tell a
continuation from a new prompt), the prompt's length and padding mask (what the kept positions index), the tokens the
query source appended (the draft's preview, for the agreement monitor) and which model filled it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from .. import compat


def _padded_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """`input_ids` with `-1` on padding (the mask may cover earlier positions too: its last columns are the ids')."""
    ids = input_ids.detach()
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = attention_mask[:, attention_mask.shape[1] - ids.shape[1]:].to(ids.device)
        ids = ids.masked_fill(~mask.bool(), -1)
    return ids


@dataclass
class ModelSignature:
    """What a cache's layers were filled for: the model (a weak reference), its number of cache layers and its KV
    heads, so a cache filled by one model is never continued by another."""

    model: weakref.ref
    num_layers: int
    num_kv_heads: int

    @classmethod
    def of(cls, model, layers: list) -> "ModelSignature":
        config = compat.text_config(model.config)
        heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", 0)
        return cls(weakref.ref(model), len(layers), int(heads))

    def matches(self, model) -> bool:
        return self.model() is model

    def __deepcopy__(self, memo):
        return self  # immutable; the weak reference must keep pointing at the same model


@dataclass
class PromptRecord:
    """The prompt a compressing cache holds.

    Attributes:
        filled (`bool`): a prefill ran since the last reset, so the layers belong to a prompt.
        length (`int`, *optional*): `L`, the width of the last prompt (left-padded).
        mask (`torch.BoolTensor` of shape `(rows, L)`, *optional*): its padding mask, one row per cache row.
        lookahead_ids (`torch.LongTensor` of shape `(rows, n)`, *optional*): the tokens the query source appended.
        lookahead_valid (`torch.BoolTensor` of shape `(rows, n)`, *optional*): False after a row's end of sequence.
        consumed (`list[torch.LongTensor]`, *optional*): the ids fed so far, `-1` on padding, in chunks; `None` once
            they are unknown (a forward given only embeddings).
        signature ([`ModelSignature`], *optional*): the model the layers were filled for.
    """

    filled: bool = False
    length: int | None = None
    mask: torch.Tensor | None = None
    lookahead_ids: torch.Tensor | None = None
    lookahead_valid: torch.Tensor | None = None
    consumed: list | None = field(default_factory=list)
    signature: ModelSignature | None = None

    def consumed_ids(self) -> torch.Tensor | None:
        """The consumed ids as one `(rows, n)` tensor (`-1` on padding), or `None` when unknown."""
        if self.consumed is None:
            return None
        if not self.consumed:
            return torch.empty(0, 0, dtype=torch.long)
        if len(self.consumed) > 1:
            self.consumed = [torch.cat(self.consumed, dim=1)]
        return self.consumed[0]

    def consume(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        """Appends what a forward fed the cache (`None` ids make the record unknown)."""
        if input_ids is None or self.consumed is None:
            self.consumed = None
            return
        ids = _padded_ids(input_ids, attention_mask)
        if self.consumed and self.consumed[0].shape[0] != ids.shape[0]:
            self.consumed = None
            return
        self.consumed.append(ids)
        if len(self.consumed) > 16:
            self.consumed = [torch.cat(self.consumed, dim=1)]

    def continues(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, held: int) -> bool:
        """Whether `input_ids` (a whole sequence, as `generate` receives it) continue what was consumed: they start
        with every one of the `held` positions the layers hold, which must all have been seen (same ids, same
        padding), and add at least one. A record of `r` times more rows than the ids (beams, `num_return_sequences`)
        compares each row `r` times, as `generate` expands them. Positions fed by forwards the cache did not see (an
        unbound model's own `generate`) are unknown: ids over them are never taken for a continuation."""
        consumed = self.consumed_ids()
        if consumed is None or input_ids is None or held == 0 or input_ids.shape[1] <= held:
            return False
        if consumed.shape[1] != held or consumed.shape[0] % input_ids.shape[0]:
            return False
        ids = _padded_ids(input_ids[:, :held], None if attention_mask is None else attention_mask[:, :held])
        repeats = consumed.shape[0] // input_ids.shape[0]
        if repeats > 1:
            ids = ids.repeat_interleave(repeats, dim=0)
        return torch.equal(ids.to(consumed.device), consumed)

    def crop(self, held: int) -> None:
        """Keeps the first `held` consumed positions (after the layers were cropped)."""
        consumed = self.consumed_ids()
        if consumed is not None and consumed.shape[1] > held:
            self.consumed = [consumed[:, :held]]

    def map_rows(self, function) -> None:
        """Applies a batch-row operation (beam reordering, expansion, selection) to the per-row records."""
        if self.mask is not None:
            self.mask = function(self.mask)
        consumed = self.consumed_ids()
        if consumed is not None and consumed.numel():
            self.consumed = [function(consumed)]

    @property
    def rows(self) -> int | None:
        """Batch rows of the held prompt, or `None` before a prefill."""
        return None if self.mask is None else self.mask.shape[0]
