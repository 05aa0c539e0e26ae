"""The one registry of methods: what each name means, what its budget counts and how it prepares a request.

One rule for defaults: a method's default knobs are its config class's defaults (`SpecKVConfig()`: 1,024 KV pairs,
as `SpecKVCache()`), except SpecKV-PC's, which are the released SpecKV-PC configs (SpecPC to 2,048 tokens, then
SpecKV to 256 pairs).

The pipeline ([`SpecApproxTextGenerationPipeline`]), the evaluation harness (`hf_specapprox_eval`) and the CLI all
read [`METHODS`]; each method is built here and nowhere else (SpecKV-PC through [`SpecKVPC`]). Preparing a request
turns a prompt into what `generate` needs: possibly shorter ids (prompt compression) and possibly a fresh compressing
cache (KV compression).

Example:

```python
>>> from hf_specapprox.integrations.registry import get_method
>>> spec = get_method("speckv-pc")  # "-" and "_" are the same
>>> spec.name, spec.budget, spec.config_arguments
('speckv_pc', 'kv', ('specpc_config', 'speckv_config'))
>>> prepared = spec.build(draft, speckv_config=SpecKVConfig(max_capacity_prompt=128))(target, input_ids, mask)
>>> out = target.generate(**prepared.model_inputs, **prepared.cache_kwargs(target), max_new_tokens=32)
```
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Callable

import torch

from .. import compat
from ..kv.baselines import SnapKVCache, StreamingLLMCache
from ..cascade import DEFAULT_SPECKV, DEFAULT_SPECPC, SpecKVPC
from ..config import SpecKVConfig, SpecPCConfig
from ..modeling.distributed import computed_on_first_rank
from ..kv.knorm import KnormCache
from ..prompt.baselines import SpecPrefillPreprocessor
from ..kv.speckv import SpecKVCache
from ..prompt.specpc import SpecPCOutput, SpecPCPreprocessor


@dataclass
class PreparedInputs:
    """What one method made of a request: the ids `generate` should see and the cache it should use.

    Args:
        input_ids (`torch.Tensor`): `(batch, length)` ids for `generate` (shorter than the prompt after prompt
            compression; `generate`'s output then starts with these, not with the original prompt).
        attention_mask (`torch.Tensor`, *optional*): their mask.
        cache ([`KVCompressionCache`], *optional*): a fresh compressing cache for this request, or `None`.
        compressed ([`SpecPCOutput`], *optional*): the prompt compressor's output (kept indices, draft tokens,
            numbers), or `None`.
        position_ids (`torch.Tensor`, *optional*): the kept tokens' original positions, for methods that keep them
            (SpecPrefill); `None` lets `generate` number the ids contiguously.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    cache: object | None = None
    compressed: SpecPCOutput | None = None
    position_ids: torch.Tensor | None = None

    @property
    def model_inputs(self) -> dict:
        """`input_ids`, `attention_mask` and (when set) `position_ids` as `generate` keyword arguments."""
        inputs = {"input_ids": self.input_ids}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs

    def cache_kwargs(self, model) -> dict:
        """`{"past_key_values": cache}` (`{"cache": cache}` on transformers ≥ 5.24), or `{}` without a cache."""
        return {} if self.cache is None else {compat.cache_kwarg_name(model): self.cache}


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    Args:
        name (`str`): the registry name.
        budget (`str` or `None`): what its `max_capacity_prompt` counts: `"kv"` (KV pairs per full-attention layer
            and KV head), `"prompt"` (prompt tokens the target sees) or `None` (no budget).
        uses_draft (`bool`): whether it runs the draft model.
        description (`str`): one line for listings.
        config_arguments (`tuple[str, ...]`): the config keyword arguments [`build`] takes, e.g. `"speckv_config"`.
        config_classes (`tuple[type, ...]`): the config class of each of `config_arguments`.
        default_configs (`Callable[[], dict]`): fresh default configs by keyword.
        builder (`Callable`): `builder(draft, **configs)` → a callable `(model, input_ids, attention_mask)` →
            [`PreparedInputs`].
    """

    name: str
    budget: str | None
    uses_draft: bool
    description: str
    config_arguments: tuple[str, ...]
    config_classes: tuple[type, ...]
    default_configs: Callable[[], dict]
    builder: Callable

    def build(self, draft=None, **configs) -> Callable[..., PreparedInputs]:
        """Builds the method with `configs` (keyword → config object; missing ones take this method's defaults).

        Returns:
            A callable `(model, input_ids, attention_mask=None)` → [`PreparedInputs`]; call it once per request
            (it makes a fresh cache each time).
        """
        unknown = sorted(set(configs) - set(self.config_arguments))
        if unknown:
            raise TypeError(f"Method {self.name!r} takes {list(self.config_arguments)}, not {unknown}.")
        if self.uses_draft and draft is None:
            raise ValueError(f"Method {self.name!r} needs a draft model: pass `draft=`.")
        resolved = self.default_configs()
        for (argument, config_class), config in ((pair, configs.get(pair[0]))
                                                 for pair in zip(self.config_arguments, self.config_classes)):
            if config is None:
                continue
            if not isinstance(config, config_class):
                raise TypeError(f"`{argument}` must be a {config_class.__name__}, got {type(config).__name__}.")
            config.validate()
            resolved[argument] = config
        return self.builder(draft, **resolved)


def _full(draft):
    return lambda model, input_ids, attention_mask=None: PreparedInputs(input_ids, attention_mask)


def _kv_method(cache_for):
    def builder(draft, **configs):
        (config,) = configs.values()

        def prepare(model, input_ids, attention_mask=None):
            return PreparedInputs(input_ids, attention_mask, cache=cache_for(draft, config, model))

        return prepare

    return builder


def kv_method(name: str, cache_class, description: str) -> MethodSpec:
    """A draft-free KV method: a [`KVCompressionCache`] subclass whose config class is its `config_class`, taken
    as `<name>_config` (defaults: the config class's own). One line in the registry's list of methods registers it."""
    argument = f"{name}_config"
    config_class = cache_class.config_class
    return MethodSpec(name, "kv", False, description, (argument,), (config_class,), lambda: {argument: config_class()},
                      _kv_method(lambda draft, config, model: cache_class(config=config, model=model)))


def _prompt_method(preprocessor_for):
    def builder(draft, specpc_config):
        preprocessor = preprocessor_for(draft, specpc_config)

        def prepare(model, input_ids, attention_mask=None):
            # A tensor-parallel target: its first rank compresses, the others receive the same prompt.
            compressed = computed_on_first_rank(model, lambda: preprocessor(input_ids, attention_mask),
                                                input_ids.device, inputs=tuple(
                                                    tensor for tensor in (input_ids, attention_mask)
                                                    if tensor is not None))
            return PreparedInputs(compressed.input_ids, compressed.attention_mask, compressed=compressed,
                                  position_ids=compressed.position_ids)

        return prepare

    return builder


def _speckv_pc(draft, specpc_config, speckv_config):
    cascade = SpecKVPC(draft, specpc_config, speckv_config)

    def prepare(model, input_ids, attention_mask=None):
        compressed, cache = cascade(input_ids, attention_mask, model=model)
        return PreparedInputs(compressed.input_ids, compressed.attention_mask, cache=cache, compressed=compressed)

    return prepare


def _spec_prefill(draft, config: SpecPCConfig):
    """SpecPrefill with its own defaults (8 voting forwards, pool 13, chunks of 32, original positions); it reads
    only the budget, the protection and `lookahead_decoding` from `config`."""
    return SpecPrefillPreprocessor(draft, max_capacity_prompt=config.max_capacity_prompt,
                                   num_sink_tokens=config.num_sink_tokens,
                                   protected_token_ids=config.protected_token_ids,
                                   lookahead_decoding=config.lookahead_decoding)


_SPECS = (
    MethodSpec("full", None, False, "the target on the whole prompt (no compression)", (), (), dict, _full),
    MethodSpec("speckv", "kv", True, "SpecKV: the draft's preview and the prompt window score the target's KV",
               ("speckv_config",), (SpecKVConfig,), lambda: {"speckv_config": SpecKVConfig()},
               _kv_method(lambda draft, config, model: SpecKVCache(draft=draft, config=config, model=model))),
    kv_method("snapkv", SnapKVCache, "SnapKV: the prompt's last tokens score the target's KV (no draft)"),
    kv_method("streamingllm", StreamingLLMCache, "StreamingLLM: attention sinks plus the most recent KV (no draft)"),
    kv_method("knorm", KnormCache, "Knorm: the keys with the smallest L2 norm (kvpress's KnormPress; no draft)"),
    MethodSpec("specpc", "prompt", True, "SpecPC: the draft's attention picks the prompt tokens the target sees",
               ("specpc_config",), (SpecPCConfig,), lambda: {"specpc_config": SpecPCConfig()},
               _prompt_method(lambda draft, config: SpecPCPreprocessor(draft, config=config))),
    MethodSpec("specprefill", "prompt", True,
               "SpecPrefill: chunks scored by the draft's last token and 7 lookahead tokens, original positions "
               "(reads budget and protection from `specpc_config`)", ("specpc_config",), (SpecPCConfig,),
               lambda: {"specpc_config": SpecPCConfig(lookahead_decoding="argmax")},  # as its code decodes (vLLM)
               _prompt_method(_spec_prefill)),
    MethodSpec("speckv_pc", "kv", True, "SpecKV-PC: SpecPC first, then SpecKV reusing SpecPC's draft tokens",
               ("specpc_config", "speckv_config"), (SpecPCConfig, SpecKVConfig),
               lambda: {"specpc_config": replace(DEFAULT_SPECPC), "speckv_config": replace(DEFAULT_SPECKV)},
               _speckv_pc),
)

#: Every registered method by name (read-only).
METHODS: MappingProxyType = MappingProxyType({spec.name: spec for spec in _SPECS})


def get_method(name: str) -> MethodSpec:
    """The [`MethodSpec`] registered as `name` (`"speckv-pc"` and `"speckv_pc"` are the same).

    Raises:
        `ValueError`: no method has that name (the message lists them).
    """
    key = name.replace("-", "_") if isinstance(name, str) else name
    if key not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose from {sorted(METHODS)}.")
    return METHODS[key]


__all__ = ["METHODS", "MethodSpec", "PreparedInputs", "get_method", "kv_method"]
