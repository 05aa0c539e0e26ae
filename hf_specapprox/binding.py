"""Binding a target model so that the compressing caches passed to its forward can see the prompt.

`Cache.update` never sees token ids, queries or the model, and SpecKV needs all three. A bound model carries one
forward pre-hook that does nothing unless a [`PromptCompressionCache`] is among the forward's arguments; then the
cache runs its compressing prefill (draft lookahead, scoring forward) and the forward continues with the last prompt
token. The hook holds no state: everything lives in the cache object of each call.
"""

from __future__ import annotations

import torch

from . import compat
from .adapters import unwrap_adapters


class _CompressionPrefillHook:
    """Forward pre-hook (with kwargs) installed by [`bind`]."""

    def __call__(self, module, args, kwargs):
        from .cache import PromptCompressionCache

        _, cache = compat.get_cache_from_kwargs(kwargs)
        if not isinstance(cache, PromptCompressionCache):
            return None
        return cache._prepare_forward(module, args, kwargs)


def _hook_ids(model: torch.nn.Module) -> list:
    return [key for key, hook in model._forward_pre_hooks.items() if isinstance(hook, _CompressionPrefillHook)]


def is_bound(model: torch.nn.Module) -> bool:
    """Whether [`bind`] was called on `model` (and not undone by [`unbind`])."""
    return bool(_hook_ids(unwrap_adapters(model)))


def bind(model: torch.nn.Module) -> torch.nn.Module:
    """Lets `model` use hf_specapprox caches in `forward` and `generate`. Call it once per target model.

    The binding is idempotent and inert for every other cache: a bound model given a `DynamicCache` (or none) behaves
    exactly as before. Undo it with [`unbind`].

    Args:
        model (`PreTrainedModel`): the target, e.g. an `AutoModelForCausalLM`. A `peft.PeftModel` with weight adapters
            (LoRA, ...) binds the model it wraps; prompt-learning adapters raise `ValueError`.

    Returns:
        The same model, for chaining.

    Example:

    ```python
    >>> import hf_specapprox
    >>> hf_specapprox.bind(target)
    >>> out = target.generate(**inputs, past_key_values=hf_specapprox.SpecKVCache(draft=draft, max_capacity_prompt=256))
    ```
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`bind` expects a torch model, got {type(model).__name__}.")
    inner = unwrap_adapters(model, role="target")
    if not is_bound(inner):
        inner.register_forward_pre_hook(_CompressionPrefillHook(), with_kwargs=True)
    return model


def unbind(model: torch.nn.Module) -> torch.nn.Module:
    """Removes what [`bind`] added to `model`."""
    inner = unwrap_adapters(model)
    for key in _hook_ids(inner):
        del inner._forward_pre_hooks[key]
        inner._forward_pre_hooks_with_kwargs.pop(key, None)
    return model
