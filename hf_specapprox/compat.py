"""Every transformers version seam that hf_specapprox depends on, in one place.

The library supports transformers 4.56 up to the newest 5.x. The differences it has to bridge are:

* 5.4 removed `cache_position` from the models: `Cache.get_mask_sizes` receives a `cache_position` tensor before
  and an integer query length after, and `Cache.update` no longer receives `cache_kwargs`.
* 5.13 added `get_max_length` next to `get_max_cache_shape`; 5.20 removed the old name.
* 5.15 made `Cache.crop` accept only a negative number of tokens to remove (earlier versions take an absolute length).
* 5.24 renamed the `past_key_values` argument of `generate` and of the models' `forward` to `cache`.
* A transformers whose `generate` calls `Cache.prepare_prefill` itself (the change proposed in docs/upstream.md, run
  in the `upstream` tox env from a patched 5.24) needs no binding hooks: see [`has_native_prepare_prefill`].
"""

from __future__ import annotations

import inspect
import sys
from functools import lru_cache
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import Cache as _TransformersCache

TRANSFORMERS_VERSION = Version(Version(transformers.__version__).base_version)

# `Cache.crop` takes only negative counts from this version on.
_CROP_NEGATIVE_ONLY = TRANSFORMERS_VERSION >= Version("5.15")

CACHE_KWARG_NAMES = ("cache", "past_key_values")

#: Whether `generate` carries caller-given `position_ids` through decoding (advances them by one per new token, in
#: `_update_model_kwargs_for_generation`): 5.x does; 4.56 and 4.57 keep re-using the prompt's last position, so
#: original positions (SpecPrefill) cannot be given to `generate` there.
GENERATE_ADVANCES_POSITION_IDS = TRANSFORMERS_VERSION >= Version("5.0")

# `generate` calls `Cache.prepare_prefill` once per call with the full prompt (docs/upstream.md): not in a release yet.
_NATIVE_PREPARE_PREFILL = "prepare_prefill" in vars(_TransformersCache)


def has_native_prepare_prefill() -> bool:
    """Whether transformers' `generate` hands every call's full prompt to `Cache.prepare_prefill` itself.

    Where it does, [`bind`] installs neither its `generate` wrapper nor its forward pre-hook (transformers runs the
    step they emulate), only the scoring attention for the bound life.
    """
    return _NATIVE_PREPARE_PREFILL


def query_length_from_mask_arg(query_length_or_cache_position: int | torch.Tensor) -> int:
    """`get_mask_sizes` receives `cache_position` (a 1-D tensor) before 5.4 and an int query length after."""
    if isinstance(query_length_or_cache_position, torch.Tensor):
        return int(query_length_or_cache_position.shape[0])
    return int(query_length_or_cache_position)


def tokens_to_remove_for_crop(argument: int, seen_tokens: int) -> int:
    """Converts the argument of `Cache.crop` into a number of tokens to remove, for the running transformers version.

    Before 5.15 a non-negative argument is the absolute length to keep (assisted decoding passes it that way); from
    5.15 on only negative counts are accepted and `crop(0)` is a no-op (5.17's deferred stop check relies on it).
    """
    if argument < 0:
        return min(-argument, seen_tokens)
    if _CROP_NEGATIVE_ONLY:
        if argument > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{argument}`) is not supported by transformers "
                f"{transformers.__version__}. Pass a negative integer to remove that many tokens instead."
            )
        return 0
    return max(seen_tokens - argument, 0)


def get_cache_from_kwargs(kwargs: dict[str, Any]) -> tuple[str | None, Any]:
    """Returns `(name, cache)` for the cache passed to a model forward as `cache=` (>= 5.24) or `past_key_values=`."""
    for name in CACHE_KWARG_NAMES:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


@lru_cache(maxsize=None)
def _forward_parameters(forward_cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(forward_cls.forward).parameters)


def cache_kwarg_name(module: torch.nn.Module) -> str:
    """The name under which `module.forward` takes its cache: `cache` from transformers 5.24 on, else `past_key_values`."""
    return "cache" if "cache" in _forward_parameters(type(module)) else "past_key_values"


def get_attn_implementation(config) -> str | None:
    """The attention implementation a config dispatches to (`"sdpa"`, `"eager"`, ...)."""
    return config._attn_implementation


def set_attn_implementation_exact(config, name: str | None) -> None:
    """Sets the attention implementation of this one config object, without validation and without touching its
    sub-configs (the public setter recurses into them, which would make an exact restore impossible).

    Used only to switch a model to the scoring wrapper for one forward and back again (see `capture.py`).
    """
    config._attn_implementation_internal = name


def eager_attention_function(module):
    """The eager attention function of `module`'s modeling file.

    transformers registers every attention implementation in `ALL_ATTENTION_FUNCTIONS` except `"eager"`, which each
    modeling file defines for itself as a module-level `eager_attention_forward` (4.56 to 5.24 alike); there is no
    public registry entry to look it up by, so it is read from the module that defines the attention class.
    """
    modeling = sys.modules[type(module).__module__]
    function = getattr(modeling, "eager_attention_forward", None)
    if function is None:
        raise ValueError(
            f"{type(module).__name__} has no module-level `eager_attention_forward`; load the model with "
            "`attn_implementation='sdpa'` to use it with hf_specapprox."
        )
    return function


def exact_generation_config_kwargs() -> dict:
    """The `generate` keyword arguments that make it use a passed `GenerationConfig` as given.

    transformers 4.x replaces a passed config's values that equal the global defaults by the model's own
    (`repetition_penalty=1.0` becomes the checkpoint's 1.1) unless `use_model_defaults=False`; 5.x fills only the
    fields left `None`, and has no such argument.
    """
    return {"use_model_defaults": False} if TRANSFORMERS_VERSION < Version("5.0") else {}


def text_config(config):
    """The decoder's text config (multimodal wrappers nest it)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def crop_must_be_negative() -> bool:
    return _CROP_NEGATIVE_ONLY


def keep_extra_generation_attributes(generation_config) -> None:
    """Makes `GenerationConfig.from_pretrained` keep the attributes it does not know (such as `hf_specapprox`).

    A generation config derived from the model config (`_from_model_config=True`: what `model.generation_config` is
    when the checkpoint had no `generation_config.json`) drops unknown attributes when it is loaded again (4.56 to
    5.24 alike), and transformers has no public setter for the flag. Once the user stores settings in it, it is no
    longer derived from the model config, so the flag is cleared. `generate` reads the flag only together with an
    unchanged hash of the config, which storing an attribute changes anyway.
    """
    if getattr(generation_config, "_from_model_config", False):
        generation_config._from_model_config = False


def is_compiling() -> bool:
    """Whether the code runs inside a `torch.compile` trace (dynamo folds this to a constant)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return False


def static_decode_unsupported_reason(model) -> str | None:
    """Why the static compressed cache cannot serve `model` on this transformers version, or `None` if it can.

    The static layers report `(capacity, offset)` as mask sizes, so masks must come from transformers' general mask
    API (`masking_utils`, which reads `kv_offset`). A model that still builds its compiled-decoding mask with its own
    `_prepare_4d_causal_attention_mask_with_cache_position` (some models on transformers 4.x) assumes offset 0 and
    would see the wrong slots.
    """
    for module in (model, getattr(model, "base_model", None)):
        if module is not None and hasattr(module, "_prepare_4d_causal_attention_mask_with_cache_position"):
            return (
                f"{type(module).__name__} builds its own compiled-decoding mask "
                "(`_prepare_4d_causal_attention_mask_with_cache_position`), which ignores the cache's mask offset"
            )
    return None


def tensor_parallel_kwargs(tp_plan="auto") -> dict:
    """The `from_pretrained` keyword arguments that shard a model with transformers' own tensor parallelism (under
    `torchrun`): `distributed_config=DistributedConfig(tp_plan=...)` where transformers has that config (5.x, which
    deprecates the plain argument), `tp_plan=...` before."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": tp_plan}
    if "tp_plan" not in inspect.signature(DistributedConfig).parameters:
        return {"tp_plan": tp_plan}
    return {"distributed_config": DistributedConfig(tp_plan=tp_plan)}

