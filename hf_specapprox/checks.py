"""Every refusal hf_specapprox can decide before any work, in one place.

Each `*_reasons` function returns the list of reasons why something cannot be served exactly (empty when it can), in
words that say what to do. [`refuse`] raises them together, before the draft or the target runs, so a user sees every
problem of a call at once. The KV side (compressing caches) and the prompt side (SpecPC and its baselines) share one
prompt rule ([`prompt_reasons`]): a `(batch, length)` tensor of integer ids, left-padded (zeros then ones in every
row), no empty row.
"""

from __future__ import annotations

import torch

from . import compat
from .modeling.capture import has_scoring_attention, original_attention_names


class UnservableError(ValueError):
    """Raised before any work when a call cannot be served exactly; `reasons` lists every reason."""

    def __init__(self, reasons: list[str]):
        self.reasons = list(reasons)
        super().__init__(reasons[0] if len(reasons) == 1 else "\n".join(f"- {reason}" for reason in reasons))


def refuse(reasons: list[str], where: str | None = None) -> None:
    """Raises [`UnservableError`] (a `ValueError`) listing `reasons`, if there are any."""
    if reasons:
        if where and len(reasons) > 1:
            reasons = [f"{where} cannot serve this call:"] + reasons
        raise UnservableError(reasons)


# ------------------------------------------------------------------------------------------------------------------
# The prompt: one rule for both sides
# ------------------------------------------------------------------------------------------------------------------
def check_prompt_types(input_ids, attention_mask, who: str) -> None:
    """Raises `TypeError` / `ValueError` for a prompt whose ids are not a 2-D integer tensor (nothing else can be
    checked then)."""
    if input_ids is None:
        raise ValueError(
            f"{who} needs the prompt's `input_ids` (the draft reads them, and a cache compares them with what it "
            "holds); it cannot take a prompt given only as `inputs_embeds`. Pass `input_ids`."
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"`input_ids` must be a non-empty (batch, length) tensor, got {shape}.")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}.")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"`attention_mask` must be a tensor, got {type(attention_mask).__name__}.")


def prompt_reasons(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, who: str) -> list[str]:
    """Why a prompt batch cannot be compressed (after [`check_prompt_types`]).

    The rule: at least one row and one column; a padding mask of the ids' shape holding only 0 and 1, in which
    every row is zeros then ones (left padding) with at least one one.
    """
    if input_ids.shape[0] == 0:
        return ["The batch is empty (0 prompts): there is nothing to compress."]
    if input_ids.shape[1] == 0:
        return ["The prompts are empty (0 tokens): there is nothing to compress. Tokenize a non-empty prompt."]
    if attention_mask is None:
        return []
    if attention_mask.dim() != 2:
        return [f"{who} needs a 2-D padding mask `(batch, length)` with the prompt, got a {attention_mask.dim()}-D "
                "mask. Pass the tokenizer's `attention_mask`."]
    if attention_mask.shape != input_ids.shape:
        return [f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape)}: {who} must receive the whole prompt with its mask at once."]
    mask = attention_mask.long()
    if not bool(((mask == 0) | (mask == 1)).all()):
        return ["`attention_mask` must hold only 0 (padding) and 1 (token)."]
    reasons = []
    empty = torch.nonzero(mask.sum(-1) == 0).flatten().tolist()
    if empty:
        reasons.append(f"Rows {empty} of the batch are all padding (their attention mask is all zeros): there is no "
                       "prompt to compress. Remove empty prompts from the batch.")
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        if not bool(mask[:, -1].all()):
            reasons.append(f"The batch is right-padded. {who} needs left padding: set "
                           "`tokenizer.padding_side = 'left'` before tokenizing.")
        else:
            reasons.append(f"The attention mask has padding between tokens. {who} needs left padding only (zeros, "
                           "then ones, in every row): set `tokenizer.padding_side = 'left'` and pass the mask the "
                           "tokenizer returned.")
    return reasons


def check_prompt(input_ids, attention_mask, who: str) -> torch.Tensor:
    """Checks a prompt batch by the one rule and returns its padding mask (all ones when `None`)."""
    check_prompt_types(input_ids, attention_mask, who)
    refuse(prompt_reasons(input_ids, attention_mask, who))
    return torch.ones_like(input_ids) if attention_mask is None else attention_mask


def context_reasons(input_ids) -> list[str]:
    """Why ids cannot be a retained context: one row of integer token ids, no padding, at least two tokens."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2):
        return ["A retained context is one row of token ids: a `(1, n)` or `(n,)` tensor."]
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        return [f"A retained context holds integer token ids, got dtype {input_ids.dtype}."]
    if input_ids.dim() == 2 and input_ids.shape[0] != 1:
        return [f"A retained context is one row (one document, one conversation so far), got {input_ids.shape[0]} "
                "rows. Retain each context in its own cache (or `RetainedContext`)."]
    if input_ids.shape[-1] < 2:
        return ["A retained context needs at least two tokens."]
    return []


# ------------------------------------------------------------------------------------------------------------------
# Generation settings
# ------------------------------------------------------------------------------------------------------------------
def setting(source, name: str):
    """`name` of a dict of `generate` kwargs or of a generation config (`None` when absent)."""
    if source is None:
        return None
    if isinstance(source, dict):
        return source.get(name)
    return getattr(source, name, None)


def generation_reasons(who: str, model_kwargs: dict, generation_config) -> list[str]:
    """Generation settings a compressing cache cannot serve exactly, whatever the prompt."""
    configs = [model_kwargs, generation_config]
    reasons = []
    if any(setting(source, "use_cache") is False for source in configs):
        reasons.append(
            f"`use_cache=False` with a {who}: without a cache every step would re-run the compressing prefill, which "
            "is neither SpecKV nor plain decoding. Leave `use_cache` on (the default)."
        )
    chunk = next((value for value in (setting(source, "prefill_chunk_size") for source in configs) if value), None)
    if chunk:
        reasons.append(
            f"`prefill_chunk_size={chunk}` with a {who}: compressing a prompt chunk by chunk is not the paper's "
            "method (each chunk would be scored without the rest of the prompt). Leave `prefill_chunk_size` unset; "
            "the compressing prefill keeps at most one layer's full keys and values at a time."
        )
    return reasons


def prompt_output_reasons(who: str, model_kwargs: dict, generation_config) -> list[str]:
    """The prompt's attentions or hidden states, which a compressing prefill does not compute (a new prompt only)."""
    reasons = []
    for flag in ("output_attentions", "output_hidden_states"):
        if any(setting(source, flag) for source in (model_kwargs, generation_config)):
            reasons.append(
                f"`{flag}=True` with a {who}: the compressing prefill does not return the prompt's "
                f"{flag[7:].replace('_', ' ')} (its forward computes only the last prompt token against the "
                "compressed cache). Run the prompt through the model with a `DynamicCache` to inspect them."
            )
    return reasons


def expand_size_reasons(expand_size) -> list[str]:
    """`prepare_prefill`'s `expand_size` must be a positive int (not a bool, float or string)."""
    if isinstance(expand_size, bool) or not isinstance(expand_size, int):
        raise TypeError(
            f"`expand_size` must be an int (the rows `generate` makes of each prompt row: num_beams, or "
            f"num_return_sequences without beams), got {type(expand_size).__name__} ({expand_size!r})."
        )
    if expand_size < 1:
        return [f"`expand_size` must be >= 1, got {expand_size}."]
    return []


def expanded_rows(model_kwargs: dict, generation_config) -> int:
    """How many times `generate` repeats each prompt row (beams, or returned sequences when not beam searching)."""
    def value(name):
        own = setting(model_kwargs, name)
        return own if own is not None else setting(generation_config, name)

    beams = value("num_beams") or 1
    sequences = value("num_return_sequences") or 1
    return beams if beams > 1 else sequences


def static_generation_reasons(who: str, sized_for: int, model_kwargs: dict, generation_config) -> list[str]:
    """A call that asks more of the static compressed layers than they were sized for."""
    reasons = []
    requested = setting(model_kwargs, "max_new_tokens")
    if requested is None:
        requested = setting(generation_config, "max_new_tokens")
    if requested is not None and requested > sized_for:
        reasons.append(
            f"This call asks for max_new_tokens={requested}, but the static compressed cache was sized for "
            f"{sized_for} (`use_static_decode`). The buffers never grow: call `cache.use_static_decode({requested})`, "
            "or use the dynamic path (`use_static_decode(None)`)."
        )
    if (setting(model_kwargs, "assistant_model") is not None or setting(model_kwargs, "prompt_lookup_num_tokens")
            or setting(generation_config, "prompt_lookup_num_tokens")):
        reasons.append(
            "Assisted decoding with a static compressed cache is not supported (its candidates and rejections "
            "change the rows per step). Use the dynamic path: `cache.use_static_decode(None)`."
        )
    return reasons


# ------------------------------------------------------------------------------------------------------------------
# The target model
# ------------------------------------------------------------------------------------------------------------------
#: Attention implementations whose masks are plain 4-D tensors (or none), which layer-wise budgets can cut per layer.
LAYER_BUDGET_ATTENTIONS = (None, "eager", "sdpa")


def sparse_prefill_reasons(model) -> list[str]:
    """Models whose attention the vertical-slash kernel cannot reproduce."""
    softcap = getattr(compat.text_config(model.config), "attn_logit_softcapping", None)
    if softcap:
        return [f"This model caps its attention logits (`attn_logit_softcapping={softcap}`), which the sparse "
                "prefill's kernel does not do. Use a dense prefill: `sparse_prefill='off'`."]
    return []


def layer_budget_reasons(who: str, layer_budgets: str, model, static: bool) -> list[str]:
    """Models on which layers holding different numbers of rows would not decode exactly.

    transformers builds one mask for all full-attention layers; only the scoring attention wrapper of a bound model
    fits it to each layer's rows (see `capture.fit_mask`), and only masks that are 4-D tensors can be cut.
    """
    reasons = []
    if not has_scoring_attention(model):
        reasons.append(
            f"{who} with layer-wise budgets (`layer_budgets='{layer_budgets}'`) needs a bound target: its layers "
            "hold different numbers of rows, and the bound model's attention fits transformers' one mask to each. "
            "Call `hf_specapprox.bind(model)` (again, after `set_attn_implementation`), or use "
            "`layer_budgets='uniform'`."
        )
    unsupported = sorted(str(name) for name in original_attention_names(model) - set(LAYER_BUDGET_ATTENTIONS))
    if unsupported:
        reasons.append(
            f"{who} with layer-wise budgets supports the 'sdpa' and 'eager' attention implementations, whose masks "
            f"it can fit to each layer's rows; this model uses {unsupported}. Load it with "
            "`attn_implementation='sdpa'`, or use `layer_budgets='uniform'`."
        )
    if static:
        reasons.append(
            f"{who}: static decoding (`use_static_decode`) needs the same rows in every layer, which layer-wise "
            "budgets do not give. Use the dynamic path (`cache.use_static_decode(None)`) or `layer_budgets='uniform'`."
        )
    return reasons


def static_model_reasons(who: str, model, layer_kinds: list[str]) -> list[str]:
    """Models the static compressed layers cannot serve (`layer_kinds`: the cache layers' class names)."""
    reason = compat.static_decode_unsupported_reason(model)
    if reason is None:
        others = sorted({kind for kind in layer_kinds if kind not in ("CompressedKVLayer", "StaticCompressedLayer")})
        if others:
            reason = f"this model has {others} cache layers (sliding-window or chunked attention)"
    if reason is None:
        return []
    return [f"{who}.use_static_decode: {reason}, which the static compressed cache does not serve. Use the dynamic "
            "path for this model: `cache.use_static_decode(None)`."]


#: The layer kinds (`config.layer_types`) the compressing caches serve.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def layer_type_reasons(model_config) -> list[str]:
    """Layer kinds the compressing caches cannot score or keep apart (linear attention, ...)."""
    config = compat.text_config(model_config)
    unsupported = sorted(set(getattr(config, "layer_types", None) or []) - set(SUPPORTED_LAYER_TYPES))
    if unsupported:
        return [f"This model has {unsupported} layers, which hf_specapprox cannot score or compress (only "
                "full-attention and sliding-window attention layers are supported). Use a plain `DynamicCache` for "
                "this model."]
    return []


__all__ = [
    "UnservableError", "check_prompt", "check_prompt_types", "context_reasons", "expand_size_reasons",
    "expanded_rows", "generation_reasons", "layer_budget_reasons", "layer_type_reasons", "prompt_output_reasons",
    "prompt_reasons", "refuse", "sparse_prefill_reasons", "static_generation_reasons", "static_model_reasons",
]
