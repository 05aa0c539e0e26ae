"""The masked-attention oracle (DESIGN.md §3), independent of hf_specapprox's code.

A compressed generation must equal one full forward over the final sequence in which the rows from the last prompt
token on see only the kept prompt positions of their KV head (plus all later tokens), while earlier prompt rows keep
full causal attention. Positions are the original ones. The oracle computes attention itself, with its own
`(batch, heads, query, key)` mask, so it shares nothing with the code under test but the model's weights.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ORACLE_NAME = "hf_specapprox_test_oracle"
MASKS_KWARG = "oracle_masks"


def continuation_keeps_the_cache() -> bool:
    """Whether a `generate` call whose ids continue a filled cache continues its compressed rows (release transformers
    with a bound model: the cache saw every fed id), or prefills again (transformers' native `prepare_prefill` hook, the
    `upstream` tox env: the cache does not see the ids `generate` feeds, and never trusts unseen positions). Either is
    exact; the oracle's prompt is then the first call's or the second's."""
    from hf_specapprox import compat

    return not compat.has_native_prepare_prefill()


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    allowed = kwargs[MASKS_KWARG][module.layer_idx].to(query.device)  # (B, H, Q, K) bool; layers may sit anywhere
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    softcap = getattr(module.config, "attn_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, value.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(ORACLE_NAME, _oracle_attention)
AttentionMaskInterface.register(ORACLE_NAME, sdpa_mask)


def _layer_kinds(config):
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return ["full_attention"] * config.num_hidden_layers
    return list(layer_types)


def oracle_masks(model, sequence_valid, prompt_length, kept_positions):
    """Per-layer `(B, H, T, T)` boolean masks.

    Args:
        sequence_valid: `(B, T)` bool, False on left padding.
        prompt_length: `L`; rows `>= L - 1` see only the kept prompt positions `< L - 1`.
        kept_positions: `{layer_idx: (B, H_kv, C) LongTensor}` for compressed full-attention layers.
    """
    config = model.config
    sequence_valid = sequence_valid.cpu()
    batch, total = sequence_valid.shape
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    group = heads // kv_heads
    index = torch.arange(total)
    causal = index[None, :] <= index[:, None]  # (T, T): key <= query
    base = causal[None, None] & sequence_valid[:, None, None, :]
    masks = {}
    for layer_idx, kind in enumerate(_layer_kinds(config)):
        allowed = base.expand(batch, heads, total, total).clone()
        if kind == "sliding_attention":
            allowed &= (index[:, None] - index[None, :] < config.sliding_window)[None, None]
        elif layer_idx in kept_positions:
            kept = torch.zeros(batch, kv_heads, total, dtype=torch.bool)
            kept.scatter_(2, kept_positions[layer_idx].cpu(), True)
            kept = kept.repeat_interleave(group, dim=1)  # (B, H, T)
            late_rows = index >= prompt_length - 1
            dropped_prompt = (index < prompt_length - 1)[None, None, :] & ~kept
            allowed[:, :, late_rows, :] &= ~dropped_prompt[:, :, None, :]
        allowed |= torch.eye(total, dtype=torch.bool)[None, None]  # padding rows attend to themselves (no NaN)
        masks[layer_idx] = allowed
    return masks


@torch.no_grad()
def oracle_logits(model, sequences, sequence_valid, prompt_length, kept_positions):
    """Logits `(B, T, V)` of the oracle forward over `sequences` (`(B, T)`)."""
    masks = oracle_masks(model, sequence_valid, prompt_length, kept_positions)
    position_ids = (sequence_valid.long().cumsum(-1) - 1).clamp(min=0)
    configs = {id(c): c for c in [model.config, model.base_model.config]}.values()
    saved = [(c, c._attn_implementation_internal) for c in configs]
    try:
        for c, _ in saved:
            c._attn_implementation_internal = ORACLE_NAME
        out = model(
            input_ids=sequences,
            attention_mask=sequence_valid.long(),
            position_ids=position_ids,
            use_cache=False,
            **{MASKS_KWARG: masks},
        )
    finally:
        for c, original in saved:
            c._attn_implementation_internal = original
    return out.logits
