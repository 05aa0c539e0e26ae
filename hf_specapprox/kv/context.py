"""A long context prefilled once and served to many questions: the retained full keys and values.

Chat over a document, an agent over a repository, a service where many users ask about one corpus: one long
context, many questions. A [`RetainedContext`] holds, read-only, the target's full keys and values of every layer over
the context (and the draft's, when the method has a draft). A compressing cache that holds one (see
`KVCompressionCache.retain_context`) answers every `generate` call whose ids start with the context by:

1. the draft continuing from its retained keys and values over the new tokens, and previewing the answer;
2. the target running the new tokens plus the preview against the retained keys and values: every layer's voting rows
   score the context and the new tokens, and the layer keeps its budget, exactly as a fresh compressing prefill over
   the whole ids would (a causal model's keys and values of the first positions do not depend on what follows);
3. decoding on the small working cache.

So each question gets the KV selected for it, and the context is never prefilled again. A retained context is
immutable: growing it (a conversation's earlier turns, recomputed with full attention) makes a new one that shares the
old one's tensors, so `copy.deepcopy` of a cache shares its context and copies only its working layers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from .. import compat
from ..checks import context_reasons, refuse


@dataclass(frozen=True)
class _Segment:
    """A run of context positions: their ids and each layer's `(keys, values)` of shape `(1, kv_heads, m, head_dim)`
    for the target and (optionally) the draft."""

    ids: torch.Tensor
    target: tuple
    draft: tuple | None

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])

    def head(self, length: int) -> "_Segment":
        """The first `length` positions (views: no copy)."""
        cut = lambda layers: None if layers is None else tuple((k[..., :length, :], v[..., :length, :])
                                                             for k, v in layers)
        return _Segment(self.ids[:length], cut(self.target), cut(self.draft))


def _layer_tensors(cache) -> tuple:
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def _versions(segments) -> tuple:
    return tuple(tensor._version for segment in segments for layers in (segment.target, segment.draft or ())
                 for pair in layers for tensor in pair)


class RetainedContext:
    """The full keys and values of a context, prefilled once, for the target (and the draft): read-only.

    Build it with [`RetainedContext.prefill`], or let a cache build its own with
    `cache.retain_context(model, input_ids)`. It is shared, never copied, by `copy.deepcopy` of a cache.

    Attributes:
        length (`int`): context positions held.
        ids (`torch.LongTensor` of shape `(length,)`): their token ids.
        offloaded (`bool`): whether the tensors live in CPU memory (each layer is moved to the model's device when a
            question's scoring forward reaches it).
    """

    def __init__(self, segments: tuple, model, draft, offloaded: bool, versions: tuple | None = None):
        self._segments = tuple(segments)
        self._model = weakref.ref(model)
        self._draft = None if draft is None else weakref.ref(draft)
        self.offloaded = offloaded
        self._versions = _versions(self._segments) if versions is None else versions

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def prefill(cls, model, input_ids: torch.Tensor, *, draft=None, offload: bool = False) -> "RetainedContext":
        """Runs the target (and the draft) once over a context and keeps their full keys and values.

        Args:
            model (`PreTrainedModel`): the target.
            input_ids (`torch.LongTensor` of shape `(1, n)` or `(n,)`): the context, one row without padding (e.g. a
                system prompt and a document, as a chat template renders them before the first question).
            draft (`PreTrainedModel`, *optional*): the draft of the caches that will use the context (SpecKV's);
                its keys and values are kept too, so its preview of every question continues from them.
            offload (`bool`, *optional*, defaults to `False`): keep the tensors in CPU memory; each question's scoring
                forward then moves one layer at a time to the device.

        Returns:
            A [`RetainedContext`].
        """
        refuse(context_reasons(input_ids), "RetainedContext.prefill")
        ids = input_ids.reshape(-1)
        target = _run(model, ids, offload)
        drafted = None if draft is None else _run(draft, ids, offload)
        segment = _Segment(ids.detach().cpu(), target, drafted)
        return cls((segment,), model, draft, offload)

    # ------------------------------------------------------------------------------------------------------------
    def __deepcopy__(self, memo):
        return self  # immutable: copies of a cache share their context

    @property
    def length(self) -> int:
        return sum(segment.length for segment in self._segments)

    @property
    def ids(self) -> torch.Tensor:
        return torch.cat([segment.ids for segment in self._segments])

    @property
    def has_draft(self) -> bool:
        return self._draft is not None

    def nbytes(self) -> int:
        """Bytes held by the retained keys and values (target and draft)."""
        return sum(tensor.numel() * tensor.element_size() for segment in self._segments
                   for layers in (segment.target, segment.draft or ()) for pair in layers for tensor in pair)

    def belongs_to(self, model) -> bool:
        return self._model() is model

    def drafted_by(self, draft) -> bool:
        return self._draft is not None and self._draft() is draft

    def unchanged(self) -> bool:
        """Whether no retained tensor was modified in place since the prefill."""
        return _versions(self._segments) == self._versions

    def common_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Per row, how many of the row's first real tokens equal the context's first tokens, `(batch,)` long."""
        context = self.ids
        batch, width = input_ids.shape
        counts = []
        for row in range(batch):
            real = input_ids[row] if attention_mask is None else input_ids[row][attention_mask[row].bool()]
            n = min(real.shape[0], context.shape[0])
            same = (real[:n].cpu() == context[:n]).long()
            counts.append(int(same.cumprod(0).sum()) if n else 0)
        return torch.tensor(counts, dtype=torch.long)

    def head(self, length: int) -> "RetainedContext":
        """The first `length` positions (sharing the tensors)."""
        segments, used = [], 0
        for segment in self._segments:
            if used >= length:
                break
            take = min(segment.length, length - used)
            segments.append(segment if take == segment.length else segment.head(take))
            used += take
        return RetainedContext(tuple(segments), self._model(), None if self._draft is None else self._draft(),
                               self.offloaded, _versions(tuple(segments)))

    def extended(self, ids: torch.Tensor, target: list, draft: list | None) -> "RetainedContext":
        """A new context: this one followed by `ids` (one row) and their full keys and values (`target` and `draft`
        per layer, `(1, kv_heads, m, head_dim)`). This one is left as it is."""
        move = (lambda tensor: tensor.detach().to("cpu")) if self.offloaded else (lambda tensor: tensor.detach())
        pack = lambda layers: None if layers is None else tuple((move(k), move(v)) for k, v in layers)
        segment = _Segment(ids.reshape(-1).detach().cpu(), pack(target), pack(draft))
        segments = self._segments + (segment,)
        return RetainedContext(segments, self._model(), None if self._draft is None else self._draft(),
                               self.offloaded, self._versions + _versions((segment,)))

    # ------------------------------------------------------------------------------------------------------------
    def _layer(self, which: str, layer_idx: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values, used = [], [], 0
        for segment in self._segments:
            if used >= length:
                break
            layers = getattr(segment, which)
            take = min(segment.length, length - used)
            k, v = layers[layer_idx]
            keys.append(k[..., :take, :])
            values.append(v[..., :take, :])
            used += take
        if len(keys) == 1:
            return keys[0].to(device), values[0].to(device)
        return torch.cat(keys, dim=-2).to(device), torch.cat(values, dim=-2).to(device)

    def num_layers(self, which: str = "target") -> int:
        return len(getattr(self._segments[0], which) or ())

    def prefix_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> "ContextPrefix":
        """The keys and values of the first `start` positions of every row of a left-padded batch whose rows start
        (after their padding) with at least `start - padding` context tokens: padding positions are zeros (the
        attention mask hides them)."""
        padding = (attention_mask.shape[1] - attention_mask.long().sum(-1)).tolist()
        return ContextPrefix(self, start, [max(start - pad, 0) for pad in padding])


class ContextPrefix:
    """The first `length` positions of a left-padded batch, as a retained context provides them: per row, its padding
    (zeros) and then the context's first `used[row]` positions. The scoring forward and the draft's preview continue
    from it."""

    def __init__(self, context: RetainedContext, length: int, used: list[int]):
        self.context = context
        self.length = length
        self.used = used
        #: The draft cache [`draft_cache`] last made (after the preview: the prefix, the new prompt positions and the
        #: preview), from which the context grows.
        self.draft_cache_used: DynamicCache | None = None

    def _rows(self, which: str, layer_idx: int, device):
        longest = max(self.used)
        keys, values = self.context._layer(which, layer_idx, longest, device)
        batch = len(self.used)
        if batch == 1 and self.used[0] == self.length:
            return keys, values
        out_k = keys.new_zeros((batch, keys.shape[1], self.length, keys.shape[-1]))
        out_v = values.new_zeros((batch, values.shape[1], self.length, values.shape[-1]))
        for row, used in enumerate(self.used):
            if used:
                out_k[row, :, self.length - used:] = keys[0, :, :used]
                out_v[row, :, self.length - used:] = values[0, :, :used]
        return out_k, out_v

    def target_layer(self, layer_idx: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's `(keys, values)` of layer `layer_idx` for the prefix, `(batch, kv_heads, length, head_dim)`."""
        return self._rows("target", layer_idx, device)

    def draft_cache(self, device) -> DynamicCache:
        """A `DynamicCache` holding the draft's keys and values of the prefix (the draft's `generate` continues it)."""
        cache = DynamicCache()
        for layer_idx in range(self.context.num_layers("draft")):
            keys, values = self._rows("draft", layer_idx, device)
            cache.update(keys, values, layer_idx)
        self.draft_cache_used = cache
        return cache


def _run(model, ids: torch.Tensor, offload: bool) -> tuple:
    """Each layer's full `(keys, values)` of `model`'s forward over one row of ids."""
    cache = DynamicCache()
    backbone = model.base_model
    backbone(input_ids=ids[None].to(model.device), use_cache=True, **{compat.cache_kwarg_name(backbone): cache})
    layers = _layer_tensors(cache)
    if offload:
        layers = tuple((k.to("cpu"), v.to("cpu")) for k, v in layers)
    return layers


__all__ = ["ContextPrefix", "RetainedContext"]
