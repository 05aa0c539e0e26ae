"""Every method of the study behind one call: `run_method(name, ...)` → the answer's token ids and numbers."""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from transformers import DynamicCache
from transformers.utils import logging

from hf_specapprox import compat

from hf_specapprox.cascade import DEFAULT_SPECPC
from hf_specapprox.config import SpecKVConfig, SpecPCConfig
from hf_specapprox.integrations.registry import METHODS as REGISTRY
from hf_specapprox.integrations.registry import get_method

logger = logging.get_logger(__name__)

#: Variants of the methods, run as `"<method>+<variant>"` (e.g. `"speckv+pyramid"`): variant -> the config field
#: and value it sets in every config of the method that has that field. `pyramid`: PyramidKV's layer-wise budgets
#: (`layer_budgets`, every KV method); `dense`: the target's prefill kept dense (`sparse_prefill="off"`, for the
#: methods whose default prefill turns sparse above 4,096 tokens as the paper's does: SpecKV and SpecKV-PC);
#: `nodrop`: SpecKV's sparse prefill keeping every prompt position (`max_capacity_prompt=None`, the official code's
#: sparse-only mode; its budget is ignored); `genconfig`: SpecPrefill's draft decoding with the checkpoint's
#: generation config (its own code applies none). A variant is offered where some config of the method defaults to
#: another value.
VARIANTS = {"pyramid": ("layer_budgets", "pyramid"), "dense": ("sparse_prefill", "off"),
            "nodrop": ("max_capacity_prompt", None), "genconfig": ("lookahead_decoding", "generation_config")}


def _offers(spec, variant: str) -> bool:
    field_name, value = VARIANTS[variant]
    if variant == "nodrop":  # the sparse prefill without eviction: SpecKV's own (its config allows no budget)
        return spec.name == "speckv"
    if variant == "genconfig":  # SpecPrefill's draft with the checkpoint's generation config (not its code's)
        return spec.name == "specprefill"
    return any(field.name == field_name and field.default != value
               for config_class in spec.config_classes for field in fields(config_class))


#: name -> what its budget means ("kv": KV pairs per layer and head, "prompt": prompt tokens, None: no budget): every
#: method of the registry (`hf_specapprox.integrations.registry`), the variants of its KV methods ([`VARIANTS`]), and `draft`
#: (the draft model answering alone, a reference).
HARNESS_METHODS = {"draft": None, **{name: spec.budget for name, spec in REGISTRY.items()},
           **{f"{name}+{variant}": spec.budget for name, spec in REGISTRY.items() for variant in VARIANTS
              if _offers(spec, variant)}}

#: SpecPC's window in the paper; smaller budgets get a window as large as the budget.
SPECPC_WINDOW = 64


def clamp_knob(name: str, value: int, limit: int, reason: str) -> int:
    """`min(value, limit)`, with a one-time warning through transformers' logger when it changes `value`."""
    if value <= limit:
        return value
    logger.warning_once(f"{name} lowered from {value} to {limit}: {reason}.")
    return limit


def _greedy(model, input_ids, attention_mask, max_new_tokens, **kwargs):
    """The same decoding for every method, as the paper's `eval.py` runs the target: greedy
    (`do_sample=False, temperature=None, top_p=None`) with every logits processor of the model's own generation
    config left on (Qwen2.5-Instruct's `repetition_penalty` of 1.05-1.1 applies), up to the answer budget.
    `top_k=None` only silences the sampling-knob advisory; it changes nothing when not sampling."""
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          do_sample=False, temperature=None, top_p=None, top_k=None, **kwargs)


def voting_layer(draft, preferred: int = 8) -> int:
    """SpecPC's first voting layer: the paper's 8, or the draft's last layer when it has fewer."""
    layers = draft.config.get_text_config(decoder=True).num_hidden_layers
    return clamp_knob("SpecPC's `starting_layer_index`", preferred, layers - 1, f"the draft has {layers} layers")


def specpc_window(budget: int) -> int:
    """SpecPC's window for a prompt budget: 64, or the budget when it is smaller (the window is part of it)."""
    return clamp_knob("SpecPC's `window_size`", SPECPC_WINDOW, budget, f"the prompt budget is {budget} tokens")


def _stage_config(config_class, spec_name: str, draft, *, budget: int, window_size: int, max_new_tokens: int):
    """One config of `config_class` for `budget`: SpecPC-like configs get SpecPC's window (and, but for SpecPrefill,
    the draft's voting layers); attention-window configs a window below the budget; SpecKV the answer length as its
    lookahead. Any other config (a new KV method) gets its budget and its defaults."""
    names = {field.name for field in fields(config_class)}
    knobs = {"max_capacity_prompt": budget}
    if issubclass(config_class, SpecPCConfig):
        knobs["window_size"] = specpc_window(budget)
        if spec_name != "specprefill":  # SpecPrefill reads only the budget
            knobs["starting_layer_index"] = voting_layer(draft)
        else:  # and decodes its draft as its own code does, on vLLM with no generation config
            knobs["lookahead_decoding"] = "argmax"
        return config_class(**knobs)
    if "window_size" in names:
        knobs["window_size"] = clamp_knob("`window_size`", window_size, budget - 1, f"the KV budget is {budget}")
    if issubclass(config_class, SpecKVConfig):
        knobs["lookahead_tokens"] = max_new_tokens
    return config_class(**knobs)


#: SpecKV-PC's first-stage prompt budget in the released configs (`cfg/paper/speckvpc2048/**`).
SPECKV_PC_PROMPT_BUDGET = DEFAULT_SPECPC.max_capacity_prompt


def method_configs(name: str, draft, *, budget: int | None, max_new_tokens: int,
                   pc_budget: int = SPECKV_PC_PROMPT_BUDGET, window_size: int = 32) -> dict:
    """The configs the harness gives method `name` of the registry (keyword → config), from its budgets: every
    config of the method gets `budget` (see [`_stage_config`]), except SpecKV-PC's first stage, which is the released
    one (`speckv/speckvpc.py`, `cfg/paper/speckvpc2048/**`): `pc_budget` tokens (2,048 by default), kernel and
    neighbours 32 and a 20-token draft preview (transformers' default `max_new_tokens`, which the released code
    leaves in place), whatever the answer length; SpecKV then reuses those 20 tokens as its lookahead."""
    spec = get_method(name)
    configs = {argument: _stage_config(config_class, spec.name, draft, budget=budget, window_size=window_size,
                                       max_new_tokens=max_new_tokens)
               for argument, config_class in zip(spec.config_arguments, spec.config_classes)}
    if spec.name == "speckv_pc":
        configs["specpc_config"] = replace(
            _stage_config(SpecPCConfig, spec.name, draft, budget=pc_budget, window_size=window_size,
                          max_new_tokens=max_new_tokens),
            kernel_size=DEFAULT_SPECPC.kernel_size, lookahead_tokens=DEFAULT_SPECPC.lookahead_tokens,
        )
    return configs


def kv_bytes(cache) -> int:
    """Bytes of the keys and values a cache holds (a compressing cache's working layers, or a `DynamicCache`)."""
    if hasattr(cache, "cache_bytes"):
        return cache.cache_bytes()
    return sum(tensor.numel() * tensor.element_size() for layer in cache.layers
               for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None))
               if isinstance(tensor, torch.Tensor) and tensor.dim() == 4)


@torch.no_grad()
def run_method(name: str, target, draft, input_ids, attention_mask, *, budget: int | None, max_new_tokens: int,
               pc_budget: int = SPECKV_PC_PROMPT_BUDGET, window_size: int = 32, streamer=None):
    """Runs one method on a (batch of) prompt(s).

    Args:
        name: `draft`, a method of the registry (`hf_specapprox.integrations.registry.METHODS`), or a variant of a KV method
            (`"speckv+pyramid"`, `"speckv+dense"`, see [`VARIANTS`]).
        budget: KV pairs per layer and KV head for KV methods (SpecKV-PC's second stage too), prompt tokens for
            prompt-compression methods; ignored by `full` and `draft`.
        pc_budget: SpecKV-PC's first-stage prompt budget (2,048 as released).
        window_size: SpecKV/SnapKV window (lowered below the budget, with a warning).

        streamer (`BaseStreamer`, *optional*): passed to the target's `generate` (a progress counter).

    Returns:
        `(new_tokens, stats)`: `(batch, n)` answer token ids and a dict of numbers (`kv_bytes`: the keys and values
        the target's cache held after the answer).
    """
    if name not in HARNESS_METHODS:
        raise ValueError(f"Unknown method {name!r}; choose from {sorted(HARNESS_METHODS)}.")
    stats = {}
    extra = {} if streamer is None else {"streamer": streamer}
    if name == "draft":
        sequences = _greedy(draft, input_ids, attention_mask, max_new_tokens, **extra)
        return sequences[:, input_ids.shape[1] :], stats
    base, _, variant = name.partition("+")
    spec = get_method(base)
    configs = method_configs(spec.name, draft, budget=budget, max_new_tokens=max_new_tokens, pc_budget=pc_budget,
                             window_size=window_size)
    if variant:  # every config of the method with the variant's field gets its value
        field_name, value = VARIANTS[variant]
        configs = {argument: replace(config, **{field_name: value})
                   if field_name in {field.name for field in fields(config)} else config
                   for argument, config in configs.items()}
    prepared = spec.build(draft if spec.uses_draft else None, **configs)(target, input_ids, attention_mask)
    inputs = prepared.model_inputs  # position_ids too, for a method that keeps original positions (SpecPrefill)
    cache = prepared.cache if prepared.cache is not None else DynamicCache()  # measured either way
    sequences = _greedy(target, inputs.pop("input_ids"), inputs.pop("attention_mask", None), max_new_tokens,
                        **inputs, **{compat.cache_kwarg_name(target): cache}, **extra)
    if prepared.compressed is not None:
        stats["kept_tokens"] = prepared.compressed.kept_lengths.tolist()
        if prepared.cache is None:
            stats["draft_seconds"] = prepared.compressed.draft_seconds
    stats["kv_bytes"] = kv_bytes(cache)
    return sequences[:, prepared.input_ids.shape[1] :], stats


def __getattr__(name: str):
    if name == "METHODS":  # renamed in 0.2 (three modules had a `METHODS` of three types)
        import warnings

        warnings.warn("`hf_specapprox_eval.methods.METHODS` is renamed `HARNESS_METHODS`; the old name will be removed "
                      "in the next minor version.", FutureWarning, stacklevel=2)
        return HARNESS_METHODS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
