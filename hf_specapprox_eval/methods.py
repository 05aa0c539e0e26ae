"""Every method of the study behind one call: `run_method(name, ...)` → the answer's token ids and numbers."""

from __future__ import annotations

import torch
from transformers.utils import logging

from hf_specapprox.config import SnapKVConfig, SpecKVConfig, SpecPCConfig, StreamingLLMConfig
from hf_specapprox.registry import METHODS as REGISTRY
from hf_specapprox.registry import get_method

logger = logging.get_logger(__name__)

#: name -> what its budget means ("kv": KV pairs per layer and head, "prompt": prompt tokens, None: no budget): every
#: method of the registry (`hf_specapprox.registry`), plus `draft` (the draft model answering alone, a reference).
METHODS = {"draft": None, **{name: spec.budget for name, spec in REGISTRY.items()}}

#: SpecPC's window in the paper; smaller budgets get a window as large as the budget.
SPECPC_WINDOW = 64


def clamp_knob(name: str, value: int, limit: int, reason: str) -> int:
    """`min(value, limit)`, with a one-time warning through transformers' logger when it changes `value`."""
    if value <= limit:
        return value
    logger.warning_once(f"{name} lowered from {value} to {limit}: {reason}.")
    return limit


def _greedy(model, input_ids, attention_mask, max_new_tokens, **kwargs):
    """The same decoding for every method: greedy, no repetition penalty, exactly the answer budget."""
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          do_sample=False, num_beams=1, repetition_penalty=1.0, temperature=None, top_p=None,
                          top_k=None, **kwargs)


def voting_layer(draft, preferred: int = 8) -> int:
    """SpecPC's first voting layer: the paper's 8, or the draft's last layer when it has fewer."""
    layers = draft.config.get_text_config(decoder=True).num_hidden_layers
    return clamp_knob("SpecPC's `starting_layer_index`", preferred, layers - 1, f"the draft has {layers} layers")


def specpc_window(budget: int) -> int:
    """SpecPC's window for a prompt budget: 64, or the budget when it is smaller (the window is part of it)."""
    return clamp_knob("SpecPC's `window_size`", SPECPC_WINDOW, budget, f"the prompt budget is {budget} tokens")


def method_configs(name: str, draft, *, budget: int | None, max_new_tokens: int, pc_budget: int = 1024,
                   window_size: int = 32) -> dict:
    """The configs the harness gives method `name` of the registry (keyword → config), from its budgets."""
    if name == "full":
        return {}
    if name in ("speckv", "snapkv", "speckv_pc"):
        window = clamp_knob("`window_size`", window_size, budget - 1, f"the KV budget is {budget}")
    if name == "speckv":
        return {"speckv_config": SpecKVConfig(max_capacity_prompt=budget, window_size=window,
                                              lookahead_tokens=max_new_tokens)}
    if name == "snapkv":
        return {"snapkv_config": SnapKVConfig(max_capacity_prompt=budget, window_size=window)}
    if name == "streamingllm":
        return {"streamingllm_config": StreamingLLMConfig(max_capacity_prompt=budget)}
    if name == "specpc":
        return {"specpc_config": SpecPCConfig(max_capacity_prompt=budget, window_size=specpc_window(budget),
                                              starting_layer_index=voting_layer(draft))}
    if name == "specprefill":  # reads the budget only (its own window of 1, every layer)
        return {"specpc_config": SpecPCConfig(max_capacity_prompt=budget, window_size=specpc_window(budget))}
    # speckv_pc: SpecPC to `pc_budget` with kernel 32 (the released configs), then SpecKV to `budget`
    return {
        "specpc_config": SpecPCConfig(max_capacity_prompt=pc_budget, window_size=specpc_window(pc_budget),
                                      kernel_size=32, lookahead_tokens=max_new_tokens,
                                      starting_layer_index=voting_layer(draft)),
        "speckv_config": SpecKVConfig(max_capacity_prompt=budget, window_size=window),
    }


@torch.no_grad()
def run_method(name: str, target, draft, input_ids, attention_mask, *, budget: int | None, max_new_tokens: int,
               pc_budget: int = 1024, window_size: int = 32):
    """Runs one method on a (batch of) prompt(s).

    Args:
        name: `draft` or a method of the registry (`hf_specapprox.registry.METHODS`).
        budget: KV pairs per layer and KV head for KV methods (SpecKV-PC's second stage too), prompt tokens for
            prompt-compression methods; ignored by `full` and `draft`.
        pc_budget: SpecKV-PC's first-stage prompt budget.
        window_size: SpecKV/SnapKV window (lowered below the budget, with a warning).

    Returns:
        `(new_tokens, stats)`: `(batch, n)` answer token ids and a dict of numbers.
    """
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose from {sorted(METHODS)}.")
    stats = {}
    if name == "draft":
        sequences = _greedy(draft, input_ids, attention_mask, max_new_tokens)
        return sequences[:, input_ids.shape[1] :], stats
    spec = get_method(name)
    configs = method_configs(spec.name, draft, budget=budget, max_new_tokens=max_new_tokens, pc_budget=pc_budget,
                             window_size=window_size)
    prepared = spec.build(draft if spec.uses_draft else None, **configs)(target, input_ids, attention_mask)
    sequences = _greedy(target, prepared.input_ids, prepared.attention_mask, max_new_tokens,
                        **prepared.cache_kwargs(target))
    if prepared.compressed is not None:
        stats["kept_tokens"] = prepared.compressed.kept_lengths.tolist()
        if prepared.cache is None:
            stats["draft_seconds"] = prepared.compressed.draft_seconds
    if prepared.cache is not None:
        stats["kv_bytes"] = prepared.cache.cache_bytes()
    return sequences[:, prepared.input_ids.shape[1] :], stats
