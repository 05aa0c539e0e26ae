"""Hands the target's own post-RoPE queries to the scorer during the compressing prefill.

The scoring forward runs with the model switched to a registered attention implementation that wraps the model's
own one (`sdpa`, `eager`, flash, ...): it computes attention exactly as before, then passes the layer's queries and
full keys/values to the prefill state, which scores and compresses that layer before the next one runs. A bound
model keeps the wrapper for as long as it is bound (it is inert without a prefill state); any other model is switched
for one call and restored in a `finally` block, so an exception leaves the model as it was. Nothing
of transformers is replaced: the wrappers are new entries in `AttentionInterface` / `AttentionMaskInterface`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import compat

#: Keyword argument that carries an [`AttentionObserver`] from the backbone call down to the attention functions.
SCORING_KWARG = "hf_specapprox_prefill"

_PREFIX = "hf_specapprox_scoring+"


def _original_attention(module, name: str | None):
    if name in (None, "eager"):
        return compat.eager_attention_function(module)
    return ALL_ATTENTION_FUNCTIONS[name]


class AttentionObserver:
    """What the scoring wrapper hands a layer's attention to when a forward carries one (as `SCORING_KWARG`).

    The target's compressing prefill and SpecPC's draft votes are observers. The default [`attend`] computes the
    layer's attention with the model's own implementation and then shows the observer the layer's post-RoPE queries
    and its keys/values through [`score_layer`]; an observer may override [`attend`] to score first and compute the
    attention itself (the sparse prefill does).
    """

    def attend(self, module, query, key, value, attention_mask, attention, **kwargs):
        """Returns the layer's attention output (as `attention` would) and observes the layer.

        Args:
            module (`torch.nn.Module`): the attention module (it carries `layer_idx`).
            query (`torch.Tensor` of shape `(batch, num_heads, q, head_dim)`), key and value (`torch.Tensor` of shape
                `(batch, num_kv_heads, k, head_dim)`): post-RoPE, as the attention function receives them.
            attention (`Callable`): the model's own attention function.
        """
        output = attention(module, query, key, value, attention_mask, **kwargs)
        self.score_layer(module, query, key, value, kwargs.get("scaling"))
        return output

    def score_layer(self, module, query, key, value, scaling) -> None:
        raise NotImplementedError


def layer_index(module) -> int:
    """The `layer_idx` of an attention module; raises if it has none (the observers tell layers apart by it)."""
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise ValueError(f"{type(module).__name__} has no `layer_idx`; hf_specapprox cannot tell its layers apart.")
    return layer_idx


def fit_mask(attention_mask, key):
    """The last `key_length` columns of a 4-D mask built for more keys than this layer holds.

    transformers builds one mask for every full-attention layer from the sizes one cache layer reports; a compressing
    cache with layer-wise budgets reports its widest layer's (`PromptCompressionCache.get_mask_sizes`), so a layer
    holding fewer rows takes the mask's last columns: the same positions' mask as one built for its own size. Every
    transformers cache layer of 4.56 and later holds exactly as many keys as its mask has columns, so this changes
    nothing for them.
    """
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        keys = key.shape[-2]
        if attention_mask.shape[-1] > keys:
            return attention_mask[..., -keys:]
    return attention_mask


def _make_wrapper(original_name: str | None):
    def attention_with_scoring(module, query, key, value, attention_mask, **kwargs):
        observer = kwargs.pop(SCORING_KWARG, None)
        attention = _original_attention(module, original_name)
        attention_mask = fit_mask(attention_mask, key)
        if observer is None:
            return attention(module, query, key, value, attention_mask, **kwargs)
        return observer.attend(module, query, key, value, attention_mask, attention, **kwargs)

    attention_with_scoring.__name__ = f"hf_specapprox_scoring_{original_name}"
    return attention_with_scoring


def scoring_attention_name(original_name: str | None) -> str:
    """Name of the registered wrapper around `original_name` (registered on first use)."""
    name = f"{_PREFIX}{original_name or 'eager'}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_wrapper(original_name))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS:
        mask_function = ALL_MASK_ATTENTION_FUNCTIONS[original_name or "eager"]
        AttentionMaskInterface.register(name, mask_function)
    return name


def _model_configs(model) -> list:
    """Every distinct config object the model's modules read their attention implementation from."""
    seen, configs = set(), []
    stack = [module.config for module in model.modules() if hasattr(getattr(module, "config", None), "to_dict")]
    while stack:
        config = stack.pop()
        if id(config) in seen:
            continue
        seen.add(id(config))
        configs.append(config)
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None and hasattr(sub, "to_dict"):
                stack.append(sub)
    return configs


def _is_scoring_name(name: str | None) -> bool:
    return name is not None and name.startswith(_PREFIX)


def install_scoring_attention(model) -> list:
    """Switches every attention layer of `model` to the scoring wrapper of its own implementation, until the returned
    record is passed to [`restore_attention`].

    The wrapper computes attention exactly as the original and does nothing else unless a forward carries a prefill
    state (`SCORING_KWARG`), so a model can keep it for as long as it is bound: concurrent `generate` calls then share
    no switch that one of them could undo under the other's feet.
    """
    saved = [(config, compat.get_attn_implementation(config)) for config in _model_configs(model)]
    for config, original in saved:
        if not _is_scoring_name(original):
            compat.set_attn_implementation_exact(config, scoring_attention_name(original))
    return saved


def restore_attention(saved: list) -> None:
    """Undoes [`install_scoring_attention`]."""
    for config, original in saved:
        compat.set_attn_implementation_exact(config, original)


def original_attention_names(model) -> set:
    """The attention implementations the model's layers compute with (behind the scoring wrapper, if installed)."""
    names = set()
    for config in _model_configs(model):
        name = compat.get_attn_implementation(config)
        names.add(name[len(_PREFIX):] if _is_scoring_name(name) else name)
    return names


def has_scoring_attention(model) -> bool:
    """Whether every attention layer of `model` already reports to a prefill state (a bound target)."""
    return all(_is_scoring_name(compat.get_attn_implementation(config)) for config in _model_configs(model))


@contextmanager
def scoring_attention(model):
    """Within the block, every attention layer of `model` also reports its queries to the prefill state.

    A bound model has the wrapper already (see [`install_scoring_attention`]) and is left untouched, so calls on
    several threads do not interfere. Any other model is switched for the block only and restored in a `finally`
    block; two such blocks on one model at once raise instead of undoing each other.
    """
    if has_scoring_attention(model):
        yield
        return
    saved = [(config, compat.get_attn_implementation(config)) for config in _model_configs(model)]
    if any(_is_scoring_name(original) for _, original in saved):
        raise RuntimeError(
            "hf_specapprox's scoring attention is already switched on for part of this model by another call that is "
            "still running. Bind the model once (`hf_specapprox.bind(model)`) to run several calls at the same time."
        )
    try:
        install_scoring_attention(model)
        yield
    finally:
        restore_attention(saved)
