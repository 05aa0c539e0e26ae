"""Binding a target model so that the compressing caches given to its `generate` and `forward` see the prompt.

`Cache.update` never sees token ids, queries or the model, and SpecKV needs all three. Until transformers calls a
cache's `prepare_prefill` itself (docs/upstream.md), [`bind`] emulates that hook on one model instance:

* its `generate` hands every call's full ids to the cache first: ids that do not continue what the cache consumed
  make it forget the old prompt, and settings it cannot serve are refused before any work;
* a forward pre-hook fills a fresh cache from the first forward's prompt (draft lookahead, scoring forward) and lets
  that forward run on the last prompt token;
* the attention layers report to the scoring wrapper of their own implementation for as long as the model is bound
  (the wrapper is inert outside a compressing prefill), so concurrent calls share no per-call switch.

All of it is per model instance, holds no state of its own (everything lives in each call's cache) and is removed by
[`unbind`]. A model given any other cache, or none, behaves exactly as before.

Where transformers calls `Cache.prepare_prefill` itself (see `compat.has_native_prepare_prefill`), `generate` does the
first two for any model, so [`bind`] installs only the scoring attention (for concurrent calls); a forward outside
`generate` then needs the explicit step (`cache.prepare_prefill(...)`) first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ContextManager, Protocol, runtime_checkable

import torch

from .. import compat
from ..modeling.adapters import unwrap_adapters
from ..modeling.capture import has_scoring_attention, install_scoring_attention, restore_attention

_BINDING_ATTRIBUTE = "_hf_specapprox_binding"


@runtime_checkable
class BoundCache(Protocol):
    """What a cache implements to be driven by a bound model (the compressing caches do): a public duck protocol."""

    def serving_generate(self, model, input_ids, model_kwargs: dict, generation_config) -> ContextManager:
        """Held around every `generate` call of a bound model, entered with the call's full ids before anything
        else."""

    def prepare_forward(self, model, args: tuple, kwargs: dict):
        """Forward pre-hook body: the `(args, kwargs)` the forward runs with, or `None` to leave them."""


def _prefill_hook(module, args, kwargs):
    _, cache = compat.get_cache_from_kwargs(kwargs)
    if not isinstance(cache, BoundCache):
        return None
    return cache.prepare_forward(module, args, kwargs)


class _BoundGenerate:
    """The bound model's `generate`: shows the cache the call's ids, then runs the model's own `generate`."""

    def __init__(self, model, original):
        self.model = model
        self.__wrapped__ = original

    def __call__(self, *args, **kwargs):
        _, cache = compat.get_cache_from_kwargs(kwargs)
        if not isinstance(cache, BoundCache):
            return self.__wrapped__(*args, **kwargs)
        input_ids = kwargs.get("input_ids", kwargs.get("inputs"))
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids = args[0]
        generation_config = kwargs.get("generation_config")
        if generation_config is None and len(args) > 1:
            generation_config = args[1]
        configs = [config for config in (generation_config, getattr(self.model, "generation_config", None))
                   if config is not None]
        with cache.serving_generate(self.model, input_ids, kwargs, _FirstOf(configs)):
            return self.__wrapped__(*args, **kwargs)


class _FirstOf:
    """Reads a generation setting from the first config that sets it (the call's, then the model's)."""

    def __init__(self, configs: list):
        self.configs = configs

    def __getattr__(self, name: str) -> Any:
        for config in self.configs:
            value = getattr(config, name, None)
            if value is not None:
                return value
        return None


@dataclass
class _Binding:
    hook: Any  # torch.utils.hooks.RemovableHandle, or None where transformers calls `prepare_prefill` itself
    attention: list  # what `restore_attention` needs
    had_own_generate: bool
    previous_generate: Any


def is_bound(model: torch.nn.Module) -> bool:
    """Whether [`bind`] was called on `model` (and not undone by [`unbind`])."""
    return isinstance(getattr(unwrap_adapters(model), _BINDING_ATTRIBUTE, None), _Binding)


def bind(model: torch.nn.Module) -> torch.nn.Module:
    """Lets `model` use hf_specapprox caches in `generate` and `forward`. Call it once per target model.

    The binding is idempotent and inert for every other cache: a bound model given a `DynamicCache` (or none) computes
    exactly what it did before. It is per instance and leaves the model's class and transformers untouched; undo it
    with [`unbind`]. On a transformers whose `generate` calls `Cache.prepare_prefill` itself, it only keeps the
    scoring attention installed (so concurrent calls share no per-call switch): `generate` needs nothing else there.

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
    if is_bound(inner):
        binding = getattr(inner, _BINDING_ATTRIBUTE)
        if not has_scoring_attention(inner):
            # The user switched the attention implementation since (`set_attn_implementation`): wrap the new one.
            binding.attention = install_scoring_attention(inner)
        return model
    attention = install_scoring_attention(inner)
    had_own_generate = "generate" in vars(inner)
    previous = vars(inner).get("generate")
    hook = None
    if not compat.has_native_prepare_prefill():  # else `generate` hands the cache its prompt itself
        hook = inner.register_forward_pre_hook(_prefill_hook, with_kwargs=True)
        if hasattr(inner, "generate"):
            inner.generate = _BoundGenerate(inner, inner.generate)
    setattr(inner, _BINDING_ATTRIBUTE, _Binding(hook, attention, had_own_generate, previous))
    return model


def unbind(model: torch.nn.Module) -> torch.nn.Module:
    """Removes what [`bind`] added to `model`."""
    inner = unwrap_adapters(model)
    binding = getattr(inner, _BINDING_ATTRIBUTE, None)
    if not isinstance(binding, _Binding):
        return model
    if binding.hook is not None:
        binding.hook.remove()
    restore_attention(binding.attention)
    if isinstance(vars(inner).get("generate"), _BoundGenerate):
        if binding.had_own_generate:
            inner.generate = binding.previous_generate
        else:
            del inner.generate
    delattr(inner, _BINDING_ATTRIBUTE)
    return model
