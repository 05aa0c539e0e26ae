"""Cache layers of the compressing caches: a full-attention layer whose prompt part is a per-KV-head subset of the
prompt positions, and the layer list `DynamicCache(config=...)` would build with those layers in place.

Layout of a full-attention layer after the compressing prefill of a prompt of `L` tokens (left-padded to `L`):

* `max_capacity_prompt` rows chosen among the first `L - 1` prompt positions, per KV head, sorted by position;
* then, appended by ordinary updates: the last prompt token (re-computed against the compressed rows, as the paper's
  code does) and every generated token.

The layer reports the number of tokens **seen** as its sequence length and `(rows + q, seen - rows)` as its mask
sizes, the pattern of transformers' own `DynamicSlidingWindowLayer`. Keys keep the RoPE of their original positions.
Sliding-window layers are the ones `DynamicCache(config=...)` builds and are never compressed.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .. import compat
from ..checks import layer_type_reasons, refuse


def tokens_to_crop(layer, max_length: int) -> int:
    """How many tokens `layer.crop(max_length)` removes (see `compat.tokens_to_remove_for_crop`); raises when that
    would reach into the compressed prompt rows, which cannot be restored."""
    to_remove = compat.tokens_to_remove_for_crop(max_length, layer.seen_tokens)
    appended = layer.num_rows - layer.compressed_rows
    if to_remove > appended:
        raise ValueError(
            f"Cannot crop {to_remove} tokens: only the {appended} tokens appended after the compressed prompt can be "
            "removed, the dropped prompt positions cannot be restored. Start again from a fresh cache."
        )
    return to_remove


class CompressedKVLayer(DynamicLayer):
    """A full-attention cache layer whose prompt part may be a per-KV-head subset of the prompt positions.

    Attributes:
        seen_tokens (`int`): tokens this layer has seen (the logical length used for positions and masks).
        kept_positions (`torch.LongTensor` of shape `(batch, num_kv_heads, kept)`, *optional*): the original
            positions (in the left-padded prompt) of the compressed prompt rows; `None` when nothing was dropped.
    """

    is_sliding = False

    def __init__(self):
        super().__init__()
        self.seen_tokens = 0
        self.kept_positions: torch.Tensor | None = None
        self.compressed_rows = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.seen_tokens += key_states.shape[-2]
        return super().update(key_states, value_states, *args, **kwargs)

    def keep(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor, seen_tokens: int):
        """Stores only `positions` (per batch row and KV head) of `key_states`/`value_states` as the layer's rows."""
        positions = positions.to(key_states.device)
        keys = key_states.gather(2, positions[..., None].expand(-1, -1, -1, key_states.shape[-1]))
        values = value_states.gather(2, positions[..., None].expand(-1, -1, -1, value_states.shape[-1]))
        self.load(keys.contiguous(), values.contiguous(), seen_tokens, positions, positions.shape[-1])

    def load(self, keys: torch.Tensor, values: torch.Tensor, seen_tokens: int, kept_positions: torch.Tensor | None,
             compressed_rows: int) -> None:
        """Replaces the layer's content: `keys`/`values` as its rows, having seen `seen_tokens` tokens."""
        self.reset()
        if keys.shape[-2]:
            super().update(keys, values)
        self.seen_tokens = seen_tokens
        self.kept_positions = kept_positions
        self.compressed_rows = compressed_rows

    @property
    def num_rows(self) -> int:
        return 0 if self.keys is None or self.keys.dim() < 3 else self.keys.shape[-2]

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length_or_cache_position, *args, **kwargs) -> tuple[int, int]:
        query_length = compat.query_length_from_mask_arg(query_length_or_cache_position)
        rows = self.num_rows
        return rows + query_length, self.seen_tokens - rows

    def get_max_cache_shape(self) -> int:
        return -1

    def get_max_length(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        """Removes the most recent tokens; see `compat.tokens_to_remove_for_crop` for the argument's meaning."""
        to_remove = tokens_to_crop(self, max_length)
        if to_remove == 0:
            return
        self.keys = self.keys[..., :-to_remove, :]
        self.values = self.values[..., :-to_remove, :]
        self.seen_tokens -= to_remove

    def reset(self) -> None:
        self.keys = None
        self.values = None
        self.is_initialized = False  # read by transformers >= 4.57 (4.56 tests `keys is None`)
        self.seen_tokens = 0
        self.kept_positions = None
        self.compressed_rows = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.kept_positions is not None:
            self.kept_positions = self.kept_positions.index_select(0, beam_idx.to(self.kept_positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.kept_positions is not None:
            self.kept_positions = self.kept_positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.kept_positions is not None:
            self.kept_positions = self.kept_positions[indices]


def build_layers(model_config) -> list:
    """The layers `DynamicCache(config=...)` would build, with every full-attention layer made compressible."""
    refuse(layer_type_reasons(model_config))
    config = compat.text_config(model_config)
    template = DynamicCache(config=config)
    layers = []
    for index, layer in enumerate(template.layers):
        if type(layer) is DynamicLayer:
            layers.append(CompressedKVLayer())
        elif type(layer) is DynamicSlidingWindowLayer:
            layers.append(layer)
        else:
            raise ValueError(
                f"Layer {index} of this model uses a `{type(layer).__name__}` cache, which hf_specapprox cannot score "
                "or compress (only full-attention and sliding-window attention layers are supported). Use a model "
                "with standard attention layers, or a plain `DynamicCache`."
            )
    if not any(isinstance(layer, CompressedKVLayer) for layer in layers):
        raise ValueError(
            "This model has no full-attention layer (every layer is sliding-window), so there is nothing to compress. "
            "Use a plain `DynamicCache`."
        )
    return layers
