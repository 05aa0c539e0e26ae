"""SpecKV for `model.generate(..., custom_generate=...)`: draft-guided KV-cache compression of long prompts.

The Hub calls `generate(model=..., **everything_the_user_passed_to_generate)`. This function takes its own arguments
out, builds a fresh `hf_specapprox.SpecKVCache` for this call, and runs the model's standard `generate` with it. The
model is bound for the call (a forward pre-hook that lets the cache see the prompt ids) and unbound afterwards if it
was not bound before, also when generation raises.
"""

from hf_specapprox import SpecKVCache, SpecKVConfig, is_bound, unbind
from hf_specapprox.compat import cache_kwarg_name

_KNOBS = ("max_capacity_prompt", "window_size", "kernel_size", "pool_type", "reduction_type", "lookahead_tokens",
          "scoring_implementation")


def generate(model, *args, draft_model=None, speckv_config=None, **kwargs):
    """Generates with a SpecKV-compressed prompt cache.

    Args:
        model: the target model (passed by transformers).
        draft_model: a small model with the target's tokenizer; it previews the answer that scores the prompt's KV.
        speckv_config (`SpecKVConfig`, *optional*): all knobs at once; or pass any of `max_capacity_prompt`,
            `window_size`, `kernel_size`, `pool_type`, `reduction_type`, `lookahead_tokens`, `scoring_implementation`
            directly (defaults: the paper's).
        *args, **kwargs: everything else goes to the model's standard `generate`.

    Returns:
        What the standard `generate` returns.
    """
    if draft_model is None:
        raise ValueError("SpecKV needs a draft model: pass `draft_model=` (a small model with the target's tokenizer).")
    knobs = {name: kwargs.pop(name) for name in _KNOBS if name in kwargs}
    if speckv_config is not None and knobs:
        raise ValueError(f"Pass either `speckv_config` or individual knobs ({sorted(knobs)}), not both.")
    cache_name = cache_kwarg_name(model)
    for name in ("past_key_values", "cache", "cache_implementation"):
        if kwargs.get(name) is not None:
            raise ValueError(f"This generate builds its own SpecKVCache; do not pass `{name}`.")
        kwargs.pop(name, None)
    was_bound = is_bound(model)
    try:
        cache = SpecKVCache(draft=draft_model, config=speckv_config or SpecKVConfig(**knobs), model=model)
        return model.generate(*args, **{cache_name: cache}, **kwargs)
    finally:
        if not was_bound:
            unbind(model)
