"""An independent plain-torch reading of the paper's SpecKV selection rule reproduces the cache's kept positions.

The reference takes the attention probabilities from transformers' own eager attention (`output_attentions=True`),
the draft tokens from its own greedy loop, and applies paper.md §2.1 steps 4.3-4.6 and 5 directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_specapprox as hs
from tiny_models import random_batch, tiny_model


@torch.no_grad()
def greedy_draft_tokens(draft, ids, steps):
    tokens = ids
    for _ in range(steps):
        logits = draft(input_ids=tokens).logits[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens[:, ids.shape[1] :]


@torch.no_grad()
def reference_kept_positions(target, ids, lookahead, budget, window, kernel):
    """paper.md §2.1 for one unpadded prompt: returns {layer: (H_kv, budget) sorted positions}."""
    prompt_length = ids.shape[1]
    full = torch.cat([ids, lookahead], dim=1)
    attentions = target(input_ids=full, output_attentions=True).attentions
    n = full.shape[1]
    scoring_window = window + 1 + lookahead.shape[1]
    kv_heads = target.config.num_key_value_heads
    kept = {}
    for layer_idx, probs in enumerate(attentions):  # (1, H, N, N), fp32 softmax over all keys
        scores = probs[0, :, n - scoring_window :, : n - scoring_window]  # window rows, non-window keys
        heads, rows, cols = scores.shape
        scores = scores.reshape(kv_heads, heads // kv_heads * rows, cols).amax(dim=1)
        scores = F.max_pool1d(scores[:, None], kernel_size=kernel, stride=1, padding=kernel // 2)[:, 0]
        top = scores.topk(budget - window, dim=-1).indices.sort(dim=-1).values
        window_positions = torch.arange(prompt_length - 1 - window, prompt_length - 1).expand(kv_heads, -1)
        kept[layer_idx] = torch.cat([top, window_positions], dim=-1)
    return kept


@settings(max_examples=15, deadline=None)
@given(
    family=st.sampled_from(["llama", "qwen2", "qwen3", "phi3"]),
    group=st.sampled_from([1, 2, 4]),
    window=st.integers(1, 5),
    extra=st.integers(2, 10),
    lookahead=st.integers(0, 5),
    seed=st.integers(0, 1000),
)
def test_kept_positions_match_paper_rule(family, group, window, extra, lookahead, seed):
    target = tiny_model(family, seed=seed, num_heads=2 * group, num_kv_heads=2, attn_implementation="eager")
    draft = tiny_model("llama", seed=seed + 1, num_layers=1)
    draft.generation_config.eos_token_id = None  # the reference loop has no EOS
    ids, _ = random_batch(1, 36, [0], seed=seed)
    budget = window + extra
    cache = hs.SpecKVCache(
        draft=draft, model=target, max_capacity_prompt=budget, window_size=window, lookahead_tokens=lookahead,
        kernel_size=1,  # no pooling plateaus: every index is decided by a distinct score
    )
    target.generate(input_ids=ids, past_key_values=cache, max_new_tokens=1, do_sample=False, pad_token_id=0)
    expected = reference_kept_positions(
        target, ids, greedy_draft_tokens(draft, ids, lookahead), budget, window, kernel=1
    )
    for layer_idx, positions in expected.items():
        assert torch.equal(cache.kept_positions(layer_idx)[0], positions), f"layer {layer_idx}"


@settings(max_examples=10, deadline=None)
@given(kernel=st.sampled_from([3, 5, 7]), seed=st.integers(0, 1000), lookahead=st.integers(1, 4))
def test_pooled_selection_matches_paper_rule_up_to_ties(kernel, seed, lookahead):
    """With pooling, equal pooled scores form plateaus; the kept set must be a valid top-k of the reference scores."""
    target = tiny_model("llama", seed=seed, num_heads=4, num_kv_heads=2, attn_implementation="eager")
    draft = tiny_model("llama", seed=seed + 1, num_layers=1)
    draft.generation_config.eos_token_id = None
    ids, _ = random_batch(1, 40, [0], seed=seed)
    budget, window = 14, 4
    cache = hs.SpecKVCache(
        draft=draft, model=target, max_capacity_prompt=budget, window_size=window, lookahead_tokens=lookahead,
        kernel_size=kernel,
    )
    target.generate(input_ids=ids, past_key_values=cache, max_new_tokens=1, do_sample=False, pad_token_id=0)
    look = greedy_draft_tokens(draft, ids, lookahead)
    full = torch.cat([ids, look], dim=1)
    with torch.no_grad():
        attentions = target(input_ids=full, output_attentions=True).attentions
    n, scoring_window = full.shape[1], window + 1 + lookahead
    for layer_idx, probs in enumerate(attentions):
        scores = probs[0, :, n - scoring_window :, : n - scoring_window].reshape(2, -1, n - scoring_window).amax(1)
        pooled = F.max_pool1d(scores[:, None], kernel, 1, kernel // 2)[:, 0]
        kept = cache.kept_positions(layer_idx)[0]
        for head in range(2):
            selected = kept[head, : budget - window]
            best = pooled[head].topk(budget - window).values.sort().values
            torch.testing.assert_close(pooled[head, selected].sort().values, best, rtol=0, atol=1e-6)
