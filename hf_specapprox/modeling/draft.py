"""The draft model's side of SpecKV: compatibility checks and the draft's lookahead (its preview of the answer)."""

from __future__ import annotations

import copy

import torch

from .. import compat
from ..config import LOOKAHEAD_DECODING_MODES

# Two checkpoints of one tokenizer family may pad their embedding tables differently (Qwen2.5-0.5B has 151,936 rows,
# Qwen2.5-14B 152,064); a larger gap means different tokenizers.
_MAX_EMBEDDING_PADDING = 1024


def _config_vocab_size(model) -> int | None:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    size = getattr(config, "vocab_size", None)
    return size if isinstance(size, int) else None


def _module_rows(module, count_attribute: str) -> int | None:
    count = getattr(module, count_attribute, None)
    if isinstance(count, int):
        return count
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0]
    return None


def _rows_of(model, getter: str, count_attribute: str) -> int | None:
    try:
        module = getattr(model, getter)()
    except (AttributeError, NotImplementedError):
        module = None
    rows = _module_rows(module, count_attribute) if module is not None else None
    return rows if rows is not None else _config_vocab_size(model)


def embeddable_ids(model) -> int | None:
    """Number of token ids `model` can read: the rows of its input embedding (its config's `vocab_size` if the
    embedding does not say), or `None` if unknown. Ids `0 .. embeddable_ids(model) - 1` are valid inputs."""
    return _rows_of(model, "get_input_embeddings", "num_embeddings")


def emittable_ids(model) -> int | None:
    """Number of token ids `model` can emit: the outputs of its language-model head (its config's `vocab_size` if
    the head does not say), or `None` if unknown. Greedy decoding emits ids `0 .. emittable_ids(model) - 1`."""
    return _rows_of(model, "get_output_embeddings", "out_features")


def check_draft_compatible(draft, target) -> None:
    """Raises before any work if `draft`'s token ids cannot be exchanged with `target`'s.

    SpecKV feeds the draft's tokens straight into the target, so both must share one tokenizer. Models do not carry
    their tokenizer, so this checks the two directions that can be checked up front:

    * every id the draft can emit (its head's outputs) must be an id the target can embed — a draft with a larger
      vocabulary than the target is refused;
    * the two vocabularies may differ only by embedding padding (at most 1,024 rows): a much smaller draft vocabulary
      means another tokenizer.

    The prompt's ids must also be ids the draft can embed; that depends on the prompt and is checked, before the draft
    runs, by [`check_prompt_ids`].
    """
    if not hasattr(draft, "generate"):
        raise TypeError(f"`draft` must be a generative model (with `generate`), got {type(draft).__name__}.")
    draft_emits, draft_embeds, target_embeds = emittable_ids(draft), embeddable_ids(draft), embeddable_ids(target)
    if draft_emits is not None and target_embeds is not None and draft_emits > target_embeds:
        raise ValueError(
            f"The draft's vocabulary ({draft_emits} ids) is larger than the target's ({target_embeds} ids): the draft "
            "may write ids the target cannot read. SpecKV feeds the draft's tokens to the target, so both must use the "
            "same tokenizer: pick a draft from the target's model family (e.g. Qwen2.5-0.5B-Instruct for a Qwen2.5 "
            "target)."
        )
    if draft_embeds is not None and target_embeds is not None and target_embeds - draft_embeds > _MAX_EMBEDDING_PADDING:
        raise ValueError(
            f"The draft's vocabulary ({draft_embeds} ids) is much smaller than the target's ({target_embeds} ids), "
            "so the two do not share a tokenizer. SpecKV feeds the prompt to the draft and the draft's tokens to the "
            "target, so both must use the same tokenizer: pick a draft from the target's model family (e.g. "
            "Qwen2.5-0.5B-Instruct for a Qwen2.5 target)."
        )


def check_prompt_ids(draft, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
    """Raises `ValueError` before the draft runs if it cannot embed every id of `input_ids` (padding included: the
    draft reads those positions too).

    The exact condition is `0 <= input_ids < embeddable_ids(draft)`; it costs one reduction and one host
    synchronisation per prompt batch.

    Args:
        draft (`PreTrainedModel`): the draft that will read the prompt.
        input_ids (`torch.LongTensor` of shape `(batch, length)`): the prompt ids as the draft will receive them.
        attention_mask (`torch.LongTensor` of shape `(batch, length)`, *optional*): only used to say whether an
            offending id sits on a padding position.
    """
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}.")
    limit = embeddable_ids(draft)
    if limit is None or input_ids.numel() == 0:
        return
    low, high = torch.stack([input_ids.min(), input_ids.max()]).tolist()
    if low >= 0 and high < limit:
        return
    bad = (input_ids < 0) | (input_ids >= limit)
    row, column = (int(i) for i in torch.nonzero(bad)[0].tolist())
    token = int(input_ids[row, column])
    where = f"row {row}, position {column}"
    if attention_mask is not None and attention_mask.shape == input_ids.shape and not bool(attention_mask[row, column]):
        raise ValueError(
            f"The prompt's padding id {token} ({where}) is not an id the draft can read (it embeds ids 0 to "
            f"{limit - 1}). Pad with an id of the vocabulary: set `tokenizer.pad_token_id` (or `pad_token_id`) to one "
            "below that, e.g. the EOS id."
        )
    raise ValueError(
        f"The prompt holds token id {token} ({where}), which the draft cannot read: it embeds ids 0 to {limit - 1}. "
        "The draft reads the target's prompt, so both must use one tokenizer: tokenize with it, or pick a draft "
        "whose vocabulary covers the target's (a draft from the target's model family)."
    )


def check_lookahead_ids(target, lookahead_ids: torch.Tensor) -> None:
    """Raises `ValueError` if the target cannot embed every id of precomputed draft tokens (`lookahead_ids=` of a
    cache), which it reads after the prompt. Same exact rule as [`check_prompt_ids`], for the target."""
    if lookahead_ids.dtype.is_floating_point or lookahead_ids.dtype.is_complex or lookahead_ids.dtype == torch.bool:
        raise TypeError(f"`lookahead_ids` must hold integer token ids, got dtype {lookahead_ids.dtype}.")
    limit = embeddable_ids(target)
    if limit is None or lookahead_ids.numel() == 0:
        return
    low, high = torch.stack([lookahead_ids.min(), lookahead_ids.max()]).tolist()
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        raise ValueError(
            f"`lookahead_ids` holds token id {bad}, which the target cannot read: it embeds ids 0 to {limit - 1}. "
            "Draft tokens must come from a draft with the target's tokenizer."
        )


def _eos_ids(generation_config) -> list[int]:
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


#: Settings of a generation config that switch on a logits processor, with the value that switches it off. The
#: `"argmax"` preview sets them all (the bare argmax of the logits); a setting whose "off" is `None` cannot be set
#: off through a config that `generate` completes from the model's own, so it is listed with a neutral value.
_NEUTRAL_PROCESSOR_SETTINGS = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": 0,
    "suppress_tokens": [],
    "begin_suppress_tokens": [],
    "renormalize_logits": False,
    "remove_invalid_values": False,
}
#: Settings of the draft's config that a greedy preview never uses (sampling, beams, outputs, caches).
_PREVIEW_SETTINGS = dict(
    do_sample=False, num_beams=1, num_return_sequences=1, temperature=None, top_k=None, top_p=None, min_p=None,
    typical_p=None, epsilon_cutoff=None, eta_cutoff=None, output_scores=False, output_logits=False,
    output_attentions=False, output_hidden_states=False, return_dict_in_generate=False, use_cache=True,
    cache_implementation=None, stop_strings=None, prefill_chunk_size=None, assistant_early_exit=None,
    prompt_lookup_num_tokens=None,
)


def preview_generation_config(draft, num_tokens: int, decoding: str = "generation_config"):
    """The `GenerationConfig` the draft's preview runs with: the draft checkpoint's own, greedy, for `num_tokens`
    new tokens (`decoding="generation_config"`, the paper's `draft.generate(do_sample=False)`), or a greedy one with
    every logits processor off (`decoding="argmax"`: the bare argmax of the logits)."""
    if decoding not in LOOKAHEAD_DECODING_MODES:
        raise ValueError(f"`lookahead_decoding` must be one of {LOOKAHEAD_DECODING_MODES}, got {decoding!r}.")
    config = copy.deepcopy(draft.generation_config)
    for name, value in _PREVIEW_SETTINGS.items():
        if hasattr(config, name) or value is not None:
            setattr(config, name, value)
    config.max_new_tokens = num_tokens
    config.max_length = None
    if decoding == "argmax":
        for name, value in _NEUTRAL_PROCESSOR_SETTINGS.items():
            setattr(config, name, value)
        for name in ("bad_words_ids", "sequence_bias", "forced_bos_token_id", "forced_eos_token_id",
                     "exponential_decay_length_penalty", "watermarking_config"):
            if getattr(config, name, None) is not None:
                setattr(config, name, None)
    eos = _eos_ids(config)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = eos[0] if eos else 0
    return config


@torch.no_grad()
def generate_lookahead(
    draft,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_tokens: int,
    *,
    deduplicate: bool = True,
    decoding: str = "generation_config",
    past_key_values=None,
):
    """The draft's greedy continuation of each prompt row, cut after its first EOS: stock
    `draft.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=num_tokens)`.

    With `decoding="generation_config"` (the default) every logits processor the draft checkpoint's generation config
    enables applies (repetition penalty, n-gram blocking, suppressed tokens, ...), as in the paper's code; sampling
    settings (temperature, top-k, top-p) do not, as with `do_sample=False`. `decoding="argmax"` switches every
    processor off (see [`preview_generation_config`]). An attention observer set with
    `hf_specapprox.modeling.capture.observing(draft, ...)` around the call sees every forward (SpecPC's votes).

    Identical rows (beam search and `num_return_sequences` expand the batch before the prefill) are decoded once
    unless `deduplicate=False` (or a `past_key_values` is given).

    Args:
        draft (`PreTrainedModel`): the draft model.
        input_ids (`torch.LongTensor` of shape `(batch, prompt_length)`): left-padded prompts.
        attention_mask (`torch.LongTensor` of shape `(batch, prompt_length)`): their padding mask.
        num_tokens (`int`): maximum number of draft tokens.
        decoding (`str`, *optional*, defaults to `"generation_config"`): one of [`LOOKAHEAD_DECODING_MODES`].
        past_key_values (`Cache`, *optional*): the draft's cache of the first positions of the prompts (a retained
            context): `generate` then runs the draft on the positions it does not hold, as for any cache it is given.

    Returns:
        `(lookahead_ids, lookahead_valid)`, both `(batch, n)` with `n <= num_tokens`; `lookahead_valid` is False for
        the padding after a row's EOS (the EOS itself is kept, as in the paper's code).

    Raises:
        `ValueError`: before the draft runs, if the prompt holds ids the draft cannot embed ([`check_prompt_ids`]),
            or `decoding` is not a known mode.
    """
    config = preview_generation_config(draft, num_tokens, decoding)
    check_prompt_ids(draft, input_ids, attention_mask)
    batch = input_ids.shape[0]
    if num_tokens == 0:
        empty = input_ids.new_zeros((batch, 0))
        return empty, empty.bool()
    rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
    if deduplicate and past_key_values is None:
        unique_rows, inverse = torch.unique(rows, dim=0, return_inverse=True)
    else:
        unique_rows, inverse = rows, torch.arange(rows.shape[0], device=rows.device)
    prompt_length = input_ids.shape[1]
    device = draft.device
    ids = unique_rows[:, :prompt_length].to(device)
    mask = unique_rows[:, prompt_length:].to(device)
    cache = {} if past_key_values is None else {compat.cache_kwarg_name(draft): past_key_values}
    sequences = draft.generate(input_ids=ids, attention_mask=mask, generation_config=config, **cache,
                               **compat.exact_generation_config_kwargs())
    return _cut_after_eos(sequences[:, prompt_length:].to(input_ids.device), _eos_ids(config), inverse)


def _cut_after_eos(new_tokens: torch.Tensor, eos_ids: list[int], inverse: torch.Tensor):
    if eos_ids:
        is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, device=new_tokens.device))
        valid = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
    else:
        valid = torch.ones_like(new_tokens, dtype=torch.bool)
    new_tokens = new_tokens.masked_fill(~valid, 0)
    return new_tokens[inverse], valid[inverse]
