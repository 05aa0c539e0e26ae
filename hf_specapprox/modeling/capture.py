"""Hands a model's own post-RoPE queries, keys and values to an observer, layer by layer, during one forward.

The compressing prefill (the target's layers vote for the KV pairs they keep) and SpecPC's draft (its layers vote for
the prompt tokens the target sees) are observers. An observer is **scoped**: [`observing`] sets it, for one model and
for the current thread or asyncio task only (a `contextvars.ContextVar`), for the duration of a block; nothing
travels through the model's forward arguments, so stock `generate` can run inside the block (the draft's preview is
`draft.generate(...)`).

Where the observer is reached: every attention layer of the model dispatches, through transformers'
`AttentionInterface`, to a registered wrapper around the model's own implementation (`sdpa`, `eager`, flash, ...).
The wrapper computes attention exactly as before and, when an observer is set for this model, shows it the layer. A
bound target (see `bind`) keeps the wrapper for as long as it is bound; any other model is switched to it for the
block and back afterwards, reference-counted, so that concurrent blocks on one model share the switch and the last
one out restores it (in a `finally` block: an exception leaves the model as it was). Nothing of transformers is
replaced: the wrappers are new entries in `AttentionInterface` / `AttentionMaskInterface`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import compat

_PREFIX = "hf_specapprox_scoring+"
# The observer of the current thread / task: `(frozenset of the observed model's attention-module ids, observer)`.
_CURRENT: ContextVar[tuple[frozenset, AttentionObserver] | None] = ContextVar("hf_specapprox_observer", default=None)
# Makes the check-and-switch of an unbound model's attention atomic across threads (a lock, not state).
_SWITCH_LOCK = threading.Lock()
_USERS_ATTRIBUTE = "_hf_specapprox_scoring_users"


def _original_attention(module, name: str | None):
    if name in (None, "eager"):
        return compat.eager_attention_function(module)
    return ALL_ATTENTION_FUNCTIONS[name]


class AttentionObserver:
    """What the scoring wrapper shows a layer to while [`observing`] has set it.

    The default [`attend`] computes the layer's attention with the model's own implementation and then shows the
    observer the layer's post-RoPE queries and its keys/values through [`score_layer`]; an observer may override
    [`attend`] to score first and compute the attention itself (the sparse prefill does).
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
    cache with layer-wise budgets reports its widest layer's (`KVCompressionCache.get_mask_sizes`), so a layer
    holding fewer rows takes the mask's last columns: the same positions' mask as one built for its own size. Every
    transformers cache layer of 4.56 and later holds exactly as many keys as its mask has columns, so this changes
    nothing for them.
    """
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        keys = key.shape[-2]
        if attention_mask.shape[-1] > keys:
            return attention_mask[..., -keys:]
    return attention_mask


def current_observer(module) -> AttentionObserver | None:
    """The observer [`observing`] set for the model that owns `module` in this thread or task, or `None`."""
    current = _CURRENT.get()
    if current is None or id(module) not in current[0]:
        return None
    return current[1]


def _make_wrapper(original_name: str | None):
    def attention_with_scoring(module, query, key, value, attention_mask, **kwargs):
        attention = _original_attention(module, original_name)
        attention_mask = fit_mask(attention_mask, key)
        # A compiled forward (static decoding) is never observed: no Python state enters its graph.
        observer = None if compat.is_compiling() else current_observer(module)
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


def is_scoring_name(name: str | None) -> bool:
    """Whether `name` is one of hf_specapprox's scoring wrappers."""
    return name is not None and name.startswith(_PREFIX)


def install_scoring_attention(model) -> list:
    """Switches every attention layer of `model` to the scoring wrapper of its own implementation, until the returned
    record is passed to [`restore_attention`].

    The wrapper computes attention exactly as the original and does nothing else unless [`observing`] set an observer
    for this model, so a model can keep it for as long as it is bound.
    """
    saved = [(config, compat.get_attn_implementation(config)) for config in _model_configs(model)]
    for config, original in saved:
        if not is_scoring_name(original):
            compat.set_attn_implementation_exact(config, scoring_attention_name(original))
    return saved


def restore_attention(saved: list) -> None:
    """Undoes [`install_scoring_attention`] where the wrapper is still installed: a config the user has switched to
    another implementation since keeps the user's choice."""
    for config, original in saved:
        if is_scoring_name(compat.get_attn_implementation(config)):
            compat.set_attn_implementation_exact(config, original)


def original_attention_names(model) -> set:
    """The attention implementations the model's layers compute with (behind the scoring wrapper, if installed)."""
    names = set()
    for config in _model_configs(model):
        name = compat.get_attn_implementation(config)
        names.add(name[len(_PREFIX):] if is_scoring_name(name) else name)
    return names


def has_scoring_attention(model) -> bool:
    """Whether every attention layer of `model` dispatches to the scoring wrapper (a bound target)."""
    return all(is_scoring_name(compat.get_attn_implementation(config)) for config in _model_configs(model))


@contextmanager
def scoring_attention(model):
    """Within the block, every attention layer of `model` dispatches to the scoring wrapper.

    A bound model has it already and is left untouched. Any other model is switched on entry to the first of
    concurrent blocks and restored on exit from the last one (in a `finally` block), so concurrent blocks on one
    model, from several threads, share the switch instead of undoing it under each other's feet.
    """
    with _SWITCH_LOCK:
        users = getattr(model, _USERS_ATTRIBUTE, None)
        if users is None and has_scoring_attention(model):
            users = None  # bound: nothing to switch or count
            switched = False
        else:
            switched = True
            if users is None:
                users = [0, install_scoring_attention(model)]
                setattr(model, _USERS_ATTRIBUTE, users)
            users[0] += 1
    try:
        yield
    finally:
        if switched:
            with _SWITCH_LOCK:
                users[0] -= 1
                if users[0] == 0:
                    restore_attention(users[1])
                    delattr(model, _USERS_ATTRIBUTE)


@contextmanager
def observing(model, observer: AttentionObserver):
    """Within the block, the attention layers of `model` show themselves to `observer`, in this thread or asyncio
    task only (other threads running the same model are not observed).

    Example:

    ```python
    >>> with observing(draft, votes):
    ...     draft.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
    ```
    """
    modules = frozenset(id(module) for module in model.modules())
    with scoring_attention(model):
        token = _CURRENT.set((modules, observer))
        try:
            yield observer
        finally:
            _CURRENT.reset(token)
