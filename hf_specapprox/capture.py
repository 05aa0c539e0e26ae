"""Hands the target's own post-RoPE queries to the scorer during the compressing prefill.

The scoring forward runs with the model switched to a registered attention implementation that wraps the model's
own one (`sdpa`, `eager`, flash, ...): it computes attention exactly as before, then passes the layer's queries and
full keys/values to the prefill state, which scores and compresses that layer before the next one runs. The switch
lasts for that one forward and is undone in a `finally` block, so an exception leaves the model as it was. Nothing
of transformers is replaced: the wrappers are new entries in `AttentionInterface` / `AttentionMaskInterface`.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import compat

#: Keyword argument that carries the prefill state from the backbone call down to the attention functions.
SCORING_KWARG = "hf_specapprox_prefill"

_PREFIX = "hf_specapprox_scoring+"


def _original_attention(module, name: str | None):
    if name in (None, "eager"):
        modeling = sys.modules[type(module).__module__]
        function = getattr(modeling, "eager_attention_forward", None)
        if function is None:
            raise ValueError(
                f"{type(module).__name__} has no module-level `eager_attention_forward`; load the model with "
                "`attn_implementation='sdpa'` to use it with hf_specapprox."
            )
        return function
    return ALL_ATTENTION_FUNCTIONS[name]


def _make_wrapper(original_name: str | None):
    def attention_with_scoring(module, query, key, value, attention_mask, **kwargs):
        prefill_state = kwargs.pop(SCORING_KWARG, None)
        output = _original_attention(module, original_name)(module, query, key, value, attention_mask, **kwargs)
        if prefill_state is not None:
            prefill_state.score_layer(module, query, key, value, kwargs.get("scaling"))
        return output

    attention_with_scoring.__name__ = f"hf_specapprox_scoring_{original_name}"
    return attention_with_scoring


def scoring_attention_name(original_name: str | None) -> str:
    """Name of the registered wrapper around `original_name` (registered on first use)."""
    name = f"{_PREFIX}{original_name or 'eager'}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_wrapper(original_name))
    if name not in AttentionMaskInterface._global_mapping:
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


@contextmanager
def scoring_attention(model):
    """Within the block, every attention layer of `model` also reports its queries to the prefill state."""
    saved = [(config, compat.get_attn_implementation(config)) for config in _model_configs(model)]
    for config, original in saved:
        if original is not None and original.startswith(_PREFIX):
            raise RuntimeError("hf_specapprox's scoring attention is already active on this model (re-entrant call).")
    try:
        for config, original in saved:
            compat.set_attn_implementation_exact(config, scoring_attention_name(original))
        yield
    finally:
        for config, original in saved:
            compat.set_attn_implementation_exact(config, original)
