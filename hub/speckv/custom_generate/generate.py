"""SpecKV for `model.generate(..., custom_generate=...)`: draft-guided KV-cache compression of long prompts.

The Hub calls `generate(model=..., **everything_the_user_passed_to_generate)`. This function takes its own arguments
out, builds a fresh `hf_specapprox.SpecKVCache` for this call, and runs the model's standard `generate` with it. The
model is bound for the call (a forward pre-hook that lets the cache see the prompt ids) and unbound afterwards if it
was not bound before, also when generation raises.

The knobs come, in this order, from `speckv_config=`, from individual knobs passed to `generate` (over the stored
config, if any), from the generation config (`SpecKVConfig(...).to_generation_config(model.generation_config)`, which
`save_pretrained` writes to `generation_config.json`), or are the paper's defaults.
"""

from dataclasses import replace

from hf_specapprox import SpecKVCache, SpecKVConfig, is_bound, unbind
from hf_specapprox.compat import cache_kwarg_name
from hf_specapprox.config import GENERATION_CONFIG_KEY

_KNOBS = ("max_capacity_prompt", "window_size", "kernel_size", "pool_type", "reduction_type", "lookahead_tokens",
          "scoring_implementation")


def _config(model, speckv_config, knobs, generation_config):
    if speckv_config is not None and knobs:
        raise ValueError(f"Pass either `speckv_config` or individual knobs ({sorted(knobs)}), not both.")
    if speckv_config is not None:
        return speckv_config
    source = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    if getattr(source, GENERATION_CONFIG_KEY, None) is not None:
        return replace(SpecKVConfig.from_generation_config(source), **knobs)  # replace() validates the result
    return SpecKVConfig(**knobs)


def generate(model, *args, draft_model=None, speckv_config=None, **kwargs):
    """Generates with a SpecKV-compressed prompt cache.

    Args:
        model: the target model (passed by transformers).
        draft_model: a small model with the target's tokenizer; it previews the answer that scores the prompt's KV.
        speckv_config (`SpecKVConfig`, *optional*): all knobs at once; or pass any of `max_capacity_prompt`,
            `window_size`, `kernel_size`, `pool_type`, `reduction_type`, `lookahead_tokens`, `scoring_implementation`
            directly (they override a config stored in the generation config; defaults: the paper's).
        *args, **kwargs: everything else goes to the model's standard `generate`.

    Returns:
        What the standard `generate` returns.
    """
    if draft_model is None:
        raise ValueError("SpecKV needs a draft model: pass `draft_model=` (a small model with the target's tokenizer).")
    knobs = {name: kwargs.pop(name) for name in _KNOBS if name in kwargs}
    config = _config(model, speckv_config, knobs, kwargs.get("generation_config"))
    cache_name = cache_kwarg_name(model)
    for name in ("past_key_values", "cache", "cache_implementation"):
        if kwargs.get(name) is not None:
            raise ValueError(f"This generate builds its own SpecKVCache; do not pass `{name}`.")
        kwargs.pop(name, None)
    was_bound = is_bound(model)
    try:
        cache = SpecKVCache(draft=draft_model, config=config, model=model)
        return model.generate(*args, **{cache_name: cache}, **kwargs)
    finally:
        if not was_bound:
            unbind(model)
