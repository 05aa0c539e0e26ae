"""Every method of the study behind one call: `run_method(name, ...)` → the answer's token ids and numbers."""

from __future__ import annotations

import torch

from .. import compat
from ..baselines import SnapKVCache, StreamingLLMCache
from ..cascade import SpecKVPC
from ..config import SpecKVConfig, SpecPCConfig
from ..prompt_baselines import SpecPrefillPreprocessor
from ..speckv import SpecKVCache
from ..specpc import SpecPCPreprocessor

#: name -> what its budget means ("kv": KV pairs per layer and head, "prompt": prompt tokens, None: no budget)
METHODS = {
    "full": None,
    "draft": None,
    "speckv": "kv",
    "snapkv": "kv",
    "streamingllm": "kv",
    "specpc": "prompt",
    "specprefill": "prompt",
    "speckv_pc": "kv",
}


def _greedy(model, input_ids, attention_mask, max_new_tokens, **kwargs):
    """The same decoding for every method: greedy, no repetition penalty, exactly the answer budget."""
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          do_sample=False, num_beams=1, repetition_penalty=1.0, temperature=None, top_p=None,
                          top_k=None, **kwargs)


def _voting_layer(draft, preferred: int = 8) -> int:
    layers = draft.config.get_text_config(decoder=True).num_hidden_layers
    return min(preferred, layers - 1)


@torch.no_grad()
def run_method(name: str, target, draft, input_ids, attention_mask, *, budget: int | None, max_new_tokens: int,
               pc_budget: int = 1024, window_size: int = 32):
    """Runs one method on a (batch of) prompt(s).

    Args:
        budget: KV pairs per layer and KV head for KV methods (SpecKV-PC's second stage too), prompt tokens for
            prompt-compression methods; ignored by `full` and `draft`.
        pc_budget: SpecKV-PC's first-stage prompt budget.
        window_size: SpecKV/SnapKV window (clipped below the budget).

    Returns:
        `(new_tokens, stats)`: `(batch, n)` answer token ids and a dict of numbers.
    """
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose from {sorted(METHODS)}.")
    stats = {}
    prompt_length = input_ids.shape[1]
    window = min(window_size, (budget or 2) - 1)
    cache_name = compat.cache_kwarg_name(target)
    if name in ("full", "draft"):
        model = target if name == "full" else draft
        sequences = _greedy(model, input_ids, attention_mask, max_new_tokens)
        return sequences[:, prompt_length:], stats
    if name in ("speckv", "snapkv", "streamingllm"):
        if name == "speckv":
            cache = SpecKVCache(draft=draft, model=target, max_capacity_prompt=budget, window_size=window,
                                lookahead_tokens=max_new_tokens)
        elif name == "snapkv":
            cache = SnapKVCache(model=target, max_capacity_prompt=budget, window_size=window)
        else:
            cache = StreamingLLMCache(model=target, max_capacity_prompt=budget)
        sequences = _greedy(target, input_ids, attention_mask, max_new_tokens, **{cache_name: cache})
        stats["kv_bytes"] = cache.cache_bytes()
        return sequences[:, prompt_length:], stats
    if name in ("specpc", "specprefill"):
        if name == "specpc":
            preprocessor = SpecPCPreprocessor(draft, max_capacity_prompt=budget,
                                              starting_layer_index=_voting_layer(draft))
        else:
            preprocessor = SpecPrefillPreprocessor(draft, max_capacity_prompt=budget)
        compressed = preprocessor(input_ids, attention_mask)
        stats.update(kept_tokens=compressed.kept_lengths.tolist(), draft_seconds=compressed.draft_seconds)
        sequences = _greedy(target, compressed.input_ids, compressed.attention_mask, max_new_tokens)
        return sequences[:, compressed.input_ids.shape[1] :], stats
    # speckv_pc
    cascade = SpecKVPC(
        draft,
        SpecPCConfig(max_capacity_prompt=pc_budget, window_size=64, kernel_size=32, lookahead_tokens=max_new_tokens,
                     starting_layer_index=_voting_layer(draft)),
        SpecKVConfig(max_capacity_prompt=budget, window_size=window),
    )
    compressed, cache = cascade(input_ids, attention_mask, model=target)
    sequences = _greedy(target, compressed.input_ids, compressed.attention_mask, max_new_tokens,
                        **{cache_name: cache})
    stats.update(kept_tokens=compressed.kept_lengths.tolist(), kv_bytes=cache.cache_bytes())
    return sequences[:, compressed.input_ids.shape[1] :], stats
