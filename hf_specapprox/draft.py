"""The draft model's side of SpecKV: compatibility checks and the greedy lookahead."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from . import compat

# Two checkpoints of one tokenizer family may pad their embedding tables differently (Qwen2.5-0.5B has 151,936 rows,
# Qwen2.5-14B 152,064); a larger gap means different tokenizers.
_MAX_EMBEDDING_PADDING = 1024


def _vocab_size(model) -> int | None:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "vocab_size", None)


def check_draft_compatible(draft, target) -> None:
    """Raises `ValueError` if `draft`'s token ids cannot be fed to `target`.

    SpecKV feeds the draft's token ids straight into the target, so both must share one tokenizer. Models do not
    carry their tokenizer, so this checks what can be checked: the draft must not emit ids the target cannot embed,
    and the two vocabularies may differ only by embedding padding.
    """
    if not hasattr(draft, "generate"):
        raise TypeError(f"`draft` must be a generative model (with `generate`), got {type(draft).__name__}.")
    draft_vocab, target_vocab = _vocab_size(draft), _vocab_size(target)
    if draft_vocab is None or target_vocab is None:
        return
    if draft_vocab > target_vocab or target_vocab - draft_vocab > _MAX_EMBEDDING_PADDING:
        raise ValueError(
            f"The draft's vocabulary ({draft_vocab} ids) does not match the target's ({target_vocab} ids). SpecKV feeds "
            "the draft's tokens to the target, so both must use the same tokenizer: pick a draft from the target's "
            "model family (e.g. Qwen2.5-0.5B-Instruct for a Qwen2.5 target)."
        )


def _eos_ids(draft) -> list[int]:
    eos = getattr(draft.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@torch.no_grad()
def generate_lookahead(
    draft,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_tokens: int,
    *,
    deduplicate: bool = True,
    model_kwargs: dict | None = None,
):
    """Greedy draft continuation of each prompt row, cut after its first EOS.

    Identical rows (beam search and `num_return_sequences` expand the batch before the prefill) are decoded once
    unless `deduplicate=False`. `model_kwargs` are passed on to every draft forward.

    Args:
        draft (`PreTrainedModel`): the draft model.
        input_ids (`torch.LongTensor` of shape `(batch, prompt_length)`): left-padded prompts.
        attention_mask (`torch.LongTensor` of shape `(batch, prompt_length)`): their padding mask.
        num_tokens (`int`): maximum number of draft tokens.

    Returns:
        `(lookahead_ids, lookahead_valid)`, both `(batch, n)` with `n <= num_tokens`; `lookahead_valid` is False for
        the padding after a row's EOS (the EOS itself is kept, as in the paper's code).
    """
    batch = input_ids.shape[0]
    if num_tokens == 0:
        empty = input_ids.new_zeros((batch, 0))
        return empty, empty.bool()
    rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
    if deduplicate:
        unique_rows, inverse = torch.unique(rows, dim=0, return_inverse=True)
    else:
        unique_rows, inverse = rows, torch.arange(rows.shape[0], device=rows.device)
    eos_ids = _eos_ids(draft)
    prompt_length = input_ids.shape[1]
    device = draft.device
    ids = unique_rows[:, :prompt_length].to(device)
    mask = unique_rows[:, prompt_length:].to(device)
    tokens = _greedy_tokens(draft, ids, mask, num_tokens, eos_ids, model_kwargs or {})
    return _cut_after_eos(tokens.to(input_ids.device), eos_ids, inverse)


def _greedy_tokens(draft, input_ids, attention_mask, num_tokens, eos_ids, model_kwargs):
    """Plain greedy decoding (argmax, no logits processors), feeding `model_kwargs` to every forward."""
    cache = DynamicCache()
    cache_name = compat.cache_kwarg_name(draft)
    if compat.forward_takes(draft, "logits_to_keep"):
        model_kwargs = {"logits_to_keep": 1, **model_kwargs}
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    mask = attention_mask
    eos = torch.tensor(eos_ids, device=input_ids.device) if eos_ids else None
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    step_ids, step_positions, generated = input_ids, positions, []
    for step in range(num_tokens):
        logits = draft(
            input_ids=step_ids, attention_mask=mask, position_ids=step_positions, use_cache=True,
            **{cache_name: cache}, **model_kwargs,
        ).logits[:, -1, :]
        token = logits.argmax(-1)
        generated.append(token)
        if eos is not None:
            finished |= torch.isin(token, eos)
            if step + 1 < num_tokens and bool(finished.all()):
                break
        if step + 1 == num_tokens:
            break
        step_ids = token[:, None]
        step_positions = step_positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(generated, dim=1)


def _cut_after_eos(new_tokens: torch.Tensor, eos_ids: list[int], inverse: torch.Tensor):
    if eos_ids:
        is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, device=new_tokens.device))
        valid = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
    else:
        valid = torch.ones_like(new_tokens, dtype=torch.bool)
    new_tokens = new_tokens.masked_fill(~valid, 0)
    return new_tokens[inverse], valid[inverse]
