"""PEFT-wrapped models: LoRA-style adapters work through the model they wrap; prompt-learning adapters are refused.

A `peft.PeftModel` is a wrapper: its `generate` calls the wrapped transformers model's `generate`, and weight
adapters (LoRA, IA3, ...) live inside that model's modules. So everything hf_specapprox attaches (the binding hook)
or calls (draft forwards, the scoring forward) goes to the wrapped model, adapters active. Prompt-learning methods
(prefix tuning, prompt tuning, P-tuning) add virtual tokens or KV pairs outside that model, which the caches cannot
score or keep apart from the prompt: they raise.
"""

from __future__ import annotations


def unwrap_adapters(model, role: str = "model"):
    """The transformers model inside a PEFT wrapper (adapters included), or `model` itself.

    Args:
        model: a `PreTrainedModel` or a `peft.PeftModel` around one.
        role: how error messages name the model (`"target"`, `"draft"`).

    Raises:
        ValueError: for prompt-learning PEFT methods.
    """
    get_base_model = getattr(model, "get_base_model", None)
    peft_config = getattr(model, "peft_config", None)
    if get_base_model is None or not isinstance(peft_config, dict):
        return model
    prompt_learning = sorted(name for name, config in peft_config.items() if getattr(config, "is_prompt_learning", False))
    if prompt_learning:
        kinds = sorted({str(getattr(peft_config[name], "peft_type", "prompt learning")) for name in prompt_learning})
        raise ValueError(
            f"The {role} uses prompt-learning PEFT adapters {prompt_learning} ({', '.join(kinds)}). They add virtual "
            "tokens or key/value pairs in front of the prompt that hf_specapprox cannot score or keep apart from it. "
            "Use a weight adapter such as LoRA (merged or not), or run without compression."
        )
    return get_base_model()
