"""A static compressed cache layer: the compressed rows of a full-attention layer in preallocated tensors, so decoding
runs at fixed shapes and the model forward can be compiled.

After the compressing prefill a `CompressedKVLayer` holds `r` rows (the kept prompt positions, sorted) and has seen
`s` tokens. [`StaticCompressedLayer`] moves those rows into buffers of `capacity` rows per batch row and KV head
(`capacity = max_capacity_prompt + 1 + max_new_tokens`: the budget, the re-fed last prompt token, the generated
tokens) and counts the rows written in a 0-dim tensor that it updates in place (as transformers' `StaticLayer` does),
so a compiled forward neither reallocates nor recompiles.

Mask sizes are `(capacity, offset)` with `offset = s - r`, constant while decoding (seen tokens and written rows both
grow by one per token). Transformers' masks read slot `j` as logical position `offset + j`, so the causal rule
`offset + j <= query position` shows exactly the written slots (each at the position the dynamic layer gives it) and
hides the unused ones; the padding mask, padded with zeros past the tokens seen, hides them too. This keeps the
dynamic layer's `(rows + q, seen - rows)` semantics at a fixed `kv_length`.

What it cannot serve: growing past `capacity` (an update that would overflow raises instead of reallocating), and
dropping more than the rows appended after the prefill (`crop`). Beam reordering is done in place.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from .. import compat
from .layers import CompressedKVLayer, tokens_to_crop


class StaticCacheOverflowError(RuntimeError):
    """Raised when a static compressed layer is asked to hold more rows than it was allocated."""


def _mark_static(*tensors: torch.Tensor) -> None:
    if compat.is_compiling():
        return
    for tensor in tensors:
        torch._dynamo.mark_static_address(tensor)


class StaticCompressedLayer(CacheLayerMixin):
    """A full-attention cache layer holding compressed prompt rows plus appended tokens in fixed-size buffers.

    Attributes:
        capacity (`int`): rows allocated per batch row and KV head.
        offset (`int`): tokens seen minus rows written (the dropped prompt positions); constant while decoding.
        rows_written (`torch.LongTensor`, 0-dim): rows written so far, updated in place.
        kept_positions (`torch.LongTensor` of shape `(batch, num_kv_heads, kept)`, *optional*): as in
            `CompressedKVLayer`.
        compressed_rows (`int`): rows that came from the compressing prefill (cannot be cropped).
    """

    is_compileable = True
    is_sliding = False
    is_croppable = True

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = int(capacity)
        self.offset = 0
        self.compressed_rows = 0
        self.kept_positions: torch.Tensor | None = None
        self.rows_written = torch.tensor(0, dtype=torch.long)
        self.keys = None
        self.values = None
        self.is_initialized = False

    @classmethod
    def from_layer(cls, layer: CompressedKVLayer, capacity: int) -> StaticCompressedLayer:
        """Moves a filled (or empty) dynamic compressed layer's rows into a new static layer."""
        static = cls(capacity)
        rows = layer.num_rows
        if rows > capacity:
            raise StaticCacheOverflowError(
                f"The layer holds {rows} rows but the static buffer has room for {capacity}."
            )
        if rows:
            static._allocate(layer.keys, layer.values)
            static.keys[..., :rows, :].copy_(layer.keys)
            static.values[..., :rows, :].copy_(layer.values)
            static.rows_written.fill_(rows)
        static.offset = layer.seen_tokens - rows
        static.compressed_rows = layer.compressed_rows
        static.kept_positions = layer.kept_positions
        return static

    def to_dynamic(self) -> CompressedKVLayer:
        """A dynamic compressed layer holding the same rows (it grows past `capacity`)."""
        layer = CompressedKVLayer()
        if self.is_initialized:
            rows = self.num_rows
            layer.load(self.keys[..., :rows, :].clone(), self.values[..., :rows, :].clone(), self.seen_tokens,
                       self.kept_positions, self.compressed_rows)
        return layer

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads = key_states.shape[:2]
        device = key_states.device
        self.keys = torch.zeros(batch, heads, self.capacity, key_states.shape[-1], dtype=key_states.dtype, device=device)
        self.values = torch.zeros(
            batch, heads, self.capacity, value_states.shape[-1], dtype=value_states.dtype, device=device
        )
        self.rows_written = self.rows_written.to(device)
        self.device = device
        self.dtype = key_states.dtype
        _mark_static(self.keys, self.values, self.rows_written)
        self.is_initialized = True

    # transformers >= 5 calls this on the first update; older versions test `keys is None`.
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._allocate(key_states, value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self._allocate(key_states, value_states)
        count = key_states.shape[-2]
        if not compat.is_compiling():
            # Eager forwards check the room (a compiled step cannot read the counter without a sync; generate never
            # asks for more than the `max_new_tokens` the buffers were sized for).
            self._check_room(count)
        slots = torch.arange(count, device=self.keys.device) + self.rows_written
        self.rows_written.add_(count)
        self.keys.index_copy_(2, slots, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, slots, value_states.to(self.values.dtype))
        return self.keys, self.values

    def _check_room(self, count: int) -> None:
        written = int(self.rows_written)
        if written + count > self.capacity:
            raise StaticCacheOverflowError(
                f"The static compressed cache has room for {self.capacity} rows per layer ({written} written), and "
                f"this forward adds {count}. It was sized by `use_static_decode(max_new_tokens=...)` for the prompt's "
                "budget + 1 + max_new_tokens; it never reallocates. Call `use_static_decode` with a larger "
                "`max_new_tokens` (and prefill again), or use the dynamic path (`use_static_decode(None)`)."
            )

    @property
    def num_rows(self) -> int:
        return int(self.rows_written)

    @property
    def seen_tokens(self) -> int:
        return self.offset + int(self.rows_written)

    def get_seq_length(self, *args, **kwargs):
        # A tensor, as transformers' `StaticLayer` returns: reading it never breaks a compiled graph.
        return self.rows_written + self.offset

    def get_mask_sizes(self, query_length_or_cache_position, *args, **kwargs) -> tuple[int, int]:
        if not compat.is_compiling():
            # `generate` builds the fixed-shape mask eagerly before each (possibly compiled) step: the room is checked
            # here, before a compiled update could write past the buffers.
            self._check_room(compat.query_length_from_mask_arg(query_length_or_cache_position))
        return self.capacity, self.offset

    def get_max_cache_shape(self) -> int:
        return self.capacity

    def get_max_length(self) -> int:
        return self.capacity

    def crop(self, max_length: int) -> None:
        to_remove = tokens_to_crop(self, max_length)
        if to_remove == 0:
            return
        self.rows_written.sub_(to_remove)  # stale rows are overwritten by the next update and masked until then

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
        self.rows_written.zero_()
        self.offset = 0
        self.compressed_rows = 0
        self.kept_positions = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            beam_idx = beam_idx.to(self.keys.device)
            self.keys.copy_(self.keys.index_select(0, beam_idx))  # in place: the buffers keep their addresses
            self.values.copy_(self.values.index_select(0, beam_idx))
        if self.kept_positions is not None:
            self.kept_positions = self.kept_positions.index_select(0, beam_idx.to(self.kept_positions.device))

    def _replace_buffers(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        # Batch size changes (before decoding starts) are the one case that allocates anew.
        self.keys, self.values = keys.contiguous(), values.contiguous()
        _mark_static(self.keys, self.values)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._replace_buffers(
                self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0)
            )
        if self.kept_positions is not None:
            self.kept_positions = self.kept_positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._replace_buffers(self.keys[indices], self.values[indices])
        if self.kept_positions is not None:
            self.kept_positions = self.kept_positions[indices]

    def offload(self):
        raise NotImplementedError("A static compressed cache layer cannot be offloaded.")

    def prefetch(self):
        raise NotImplementedError("A static compressed cache layer cannot be offloaded.")
