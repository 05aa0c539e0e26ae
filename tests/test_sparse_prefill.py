"""The sparse (vertical-slash) prefill of SpecKV against an independent oracle.

The oracle runs the prefill over `prompt + lookahead` itself, layer by layer, with its own attention function: each
full-attention layer takes dense eager probabilities, scores the candidates (max over the voting rows and the query
heads of a KV head, max-pool), keeps the top `C - w` plus the window, takes the top `V` candidates as vertical
columns, and computes its output under the vertical-slash mask (64-query blocks aligned to each row's first token,
each seeing the band `[end - (band + block), end)` and its KV head's vertical columns (`end` as if the sequence were
padded to whole blocks), causal, padding masked). A second oracle forward over the final sequence then checks every
decoding step: rows before the last prompt token see the same vertical-slash mask, later rows see only the kept
prompt positions. The thresholds are forced low so tiny prompts cross them. A batch is also checked against its rows
run alone (the official code runs one row at a time).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import hf_specapprox as hs
from oracle import MASKS_KWARG, ORACLE_NAME, _layer_kinds
from tiny_models import random_batch, tiny_model

pytest.importorskip("torch.nn.attention.flex_attention")

PREFILL_ORACLE = "hf_specapprox_test_sparse_prefill_oracle"
STATE_KWARG = "sparse_oracle_state"


def _top(scores, count):
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count].sort(dim=-1).values


def _vertical_slash_allowed(n, vertical, valid, band, block):
    """(B, H_kv, n, n) bool: the vertical-slash rule, written from its definition; each row's blocks start at its first
    token, as they do when the row runs alone."""
    batch, kv_heads, _ = vertical.shape
    allowed = torch.zeros(batch, kv_heads, n, n, dtype=torch.bool)
    for row in range(batch):
        first = int(valid[row].long().argmax())
        rows = torch.arange(n) - first
        ends = first + (rows // block + 1) * block  # each query's block end (as MInference pads: a ragged last too)
        keys = torch.arange(n)
        causal = keys[None, :] <= torch.arange(n)[:, None]
        in_band = keys[None, :] >= (ends - (band + block))[:, None]
        is_vertical = torch.zeros(kv_heads, n, dtype=torch.bool)
        is_vertical.scatter_(1, vertical[row], True)
        allowed[row] = causal[None] & (in_band[None] | is_vertical[:, None, :])
    return allowed & valid[:, None, None, :]


class PrefillOracle:
    def __init__(self, prompt_length, valid, budget, window, kernel, vertical, band, block, kinds, sliding):
        self.prompt_length, self.valid = prompt_length, valid
        self.budget, self.window, self.kernel = budget, window, kernel
        self.vertical, self.band, self.block = vertical, band, block
        self.kinds, self.sliding = kinds, sliding
        self.kept, self.columns = {}, {}


def _prefill_oracle_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    state: PrefillOracle = kwargs[STATE_KWARG]
    layer = module.layer_idx
    batch, heads, n, _ = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    k = key.repeat_interleave(group, dim=1).float()
    v = value.repeat_interleave(group, dim=1).float()
    logits = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling
    index = torch.arange(n)
    causal = (index[None, :] <= index[:, None])[None, None] & state.valid[:, None, None, :]
    if state.kinds[layer] == "sliding_attention":
        allowed = causal & (index[:, None] - index[None, :] < state.sliding)[None, None]
    else:
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        length, window = state.prompt_length, state.window
        query_start = window_start = length - 1 - window
        votes = probs[:, :, query_start:, :] * state.valid[:, None, query_start:, None]
        scores = votes.reshape(batch, kv_heads, group * (n - query_start), n).amax(dim=2)[..., :window_start]
        pooled = F.max_pool1d(scores.reshape(-1, 1, window_start), state.kernel, 1, state.kernel // 2)
        pooled = pooled.reshape(batch, kv_heads, window_start)
        pooled = pooled.masked_fill(~state.valid[:, None, :window_start], float("-inf"))
        if state.budget is None:  # the sparse prefill without eviction: every prompt position stays
            state.kept[layer] = torch.arange(length - 1).expand(batch, kv_heads, -1)
        else:
            selected = _top(pooled, state.budget - window)
            window_positions = torch.arange(window_start, length - 1).expand(batch, kv_heads, -1)
            state.kept[layer] = torch.cat([selected, window_positions], dim=-1)
        state.columns[layer] = _top(pooled, min(state.vertical, window_start))
        allowed = _vertical_slash_allowed(n, state.columns[layer], state.valid, state.band, state.block)
        allowed = allowed.repeat_interleave(group, dim=1)
    allowed = allowed | torch.eye(n, dtype=torch.bool)[None, None]
    out = torch.matmul(torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1), v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PREFILL_ORACLE, _prefill_oracle_attention)
AttentionMaskInterface.register(PREFILL_ORACLE, sdpa_mask)


def _switch(model, name):
    configs = {id(c): c for c in [model.config, model.base_model.config]}.values()
    saved = [(c, c._attn_implementation_internal) for c in configs]
    for c, _ in saved:
        c._attn_implementation_internal = name
    return saved


def _restore(saved):
    for c, original in saved:
        c._attn_implementation_internal = original


@torch.no_grad()
def sparse_oracle_logits(model, ids, mask, lookahead, sequences, *, budget, window, kernel, vertical, band, block):
    """Logits `(B, T, V)` of the oracle for the final `sequences` (prompt + generated)."""
    config = model.config
    kinds = _layer_kinds(config)
    prompt_length = ids.shape[1]
    valid = torch.cat([mask.bool(), torch.ones_like(lookahead, dtype=torch.bool)], dim=1)
    state = PrefillOracle(prompt_length, valid, budget, window, kernel, vertical, band, block, kinds,
                          getattr(config, "sliding_window", None))
    saved = _switch(model, PREFILL_ORACLE)
    try:
        full = torch.cat([ids, lookahead], dim=1)
        model.base_model(input_ids=full, attention_mask=valid.long(),
                         position_ids=(valid.long().cumsum(-1) - 1).clamp(min=0), use_cache=False,
                         **{STATE_KWARG: state})
    finally:
        _restore(saved)
    # The final sequence: rows < L - 1 under the prefill's vertical-slash mask, later rows see the kept positions.
    total = sequences.shape[1]
    seq_valid = torch.cat([mask.bool(), torch.ones(ids.shape[0], total - prompt_length, dtype=torch.bool)], dim=1)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    group = heads // kv_heads
    index = torch.arange(total)
    causal = (index[None, :] <= index[:, None])[None, None] & seq_valid[:, None, None, :]
    masks = {}
    for layer, kind in enumerate(kinds):
        allowed = causal.expand(ids.shape[0], heads, total, total).clone()
        if kind == "sliding_attention":
            allowed &= (index[:, None] - index[None, :] < config.sliding_window)[None, None]
        else:
            slash = _vertical_slash_allowed(total, state.columns[layer], seq_valid, band, block)
            early = index < prompt_length - 1
            allowed[:, :, early, :] &= slash.repeat_interleave(group, dim=1)[:, :, early, :]
            kept = torch.zeros(ids.shape[0], kv_heads, total, dtype=torch.bool)
            kept.scatter_(2, state.kept[layer], True)
            dropped = (index < prompt_length - 1)[None, None, :] & ~kept.repeat_interleave(group, dim=1)
            allowed[:, :, ~early, :] &= ~dropped[:, :, None, :]
        masks[layer] = allowed | torch.eye(total, dtype=torch.bool)[None, None]
    saved = _switch(model, ORACLE_NAME)
    try:
        out = model(input_ids=sequences, attention_mask=seq_valid.long(),
                    position_ids=(seq_valid.long().cumsum(-1) - 1).clamp(min=0), use_cache=False,
                    **{MASKS_KWARG: masks})
    finally:
        _restore(saved)
    return out.logits, state


SPARSE = dict(sparse_prefill="on", prefill_vertical_size=5, prefill_window_size=8, prefill_block_size=4)


def _generate(target, cache, ids, mask, new_tokens):
    return target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=0)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(["llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3"]),
    attn=st.sampled_from(["sdpa", "eager"]),
    group=st.sampled_from([1, 2]),
    batch=st.integers(1, 3),
    prompt_length=st.integers(30, 60),
    lookahead=st.integers(0, 4),
    vertical=st.integers(1, 8),
    geometry=st.sampled_from([(8, 4), (4, 4), (16, 8)]),  # the band is whole blocks (the official guard)
    data=st.data(),
)
def test_sparse_prefill_equals_the_vertical_slash_oracle(family, attn, group, batch, prompt_length, lookahead,
                                                          vertical, geometry, data):
    band, block = geometry
    target = hs.bind(tiny_model(family, seed=5, num_kv_heads=2, num_heads=2 * group, attn_implementation=attn))
    paddings = [0] + [data.draw(st.integers(0, prompt_length // 2)) for _ in range(batch - 1)]
    ids, mask = random_batch(batch, prompt_length, paddings, seed=6)
    look = torch.randint(3, 90, (1, lookahead), generator=torch.Generator().manual_seed(7))
    budget, window, kernel = min(12, band + vertical), 3, 3  # the official guard: C <= band + vertical
    knobs = dict(max_capacity_prompt=budget, window_size=window, kernel_size=kernel, sparse_prefill="on",
                 prefill_vertical_size=vertical, prefill_window_size=band, prefill_block_size=block)
    cache = hs.SpecKVCache(lookahead_ids=look, **knobs)
    out = _generate(target, cache, ids, mask, new_tokens=3)
    expected, state = sparse_oracle_logits(target, ids, mask, look.expand(batch, -1), out.sequences[:, :-1],
                                           budget=budget, window=window, kernel=kernel, vertical=vertical,
                                           band=band, block=block)
    for layer, kept in state.kept.items():
        assert torch.equal(cache.kept_positions(layer), kept), f"layer {layer}"
    actual = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(actual, expected[:, prompt_length - 1 :], atol=1e-4, rtol=0)


def test_sparse_prefill_changes_the_answer_and_dense_stays_dense():
    """The sparse path really ran: its logits differ from the dense prefill's, which equal the sparse oracle only
    when the mask hides nothing (a band wider than the prompt)."""
    target = hs.bind(tiny_model("llama", seed=8, num_heads=4, num_kv_heads=2))
    ids, mask = random_batch(2, 48, [0, 5], seed=9)
    look = torch.tensor([[11, 12, 13]])
    base = dict(max_capacity_prompt=12, window_size=3, kernel_size=3, lookahead_ids=look)
    dense = _generate(target, hs.SpecKVCache(sparse_prefill="off", **base), ids, mask, 3)
    sparse = _generate(target, hs.SpecKVCache(**SPARSE, **base), ids, mask, 3)
    assert (torch.stack(dense.logits) - torch.stack(sparse.logits)).abs().max() > 1e-3
    wide = dict(SPARSE, prefill_window_size=64)  # the band covers every key: the sparse mask is the causal one
    wide_out = _generate(target, hs.SpecKVCache(**wide, **base), ids, mask, 3)
    torch.testing.assert_close(torch.stack(wide_out.logits), torch.stack(dense.logits), atol=1e-4, rtol=0)


def test_auto_switches_on_above_the_threshold_only():
    target = hs.bind(tiny_model("qwen2", seed=10, num_heads=4, num_kv_heads=2))
    ids, mask = random_batch(1, 40, [0], seed=11)
    look = torch.tensor([[5, 6]])
    base = dict(max_capacity_prompt=12, window_size=3, kernel_size=3, lookahead_ids=look,
                prefill_vertical_size=4, prefill_window_size=8, prefill_block_size=4)
    on = torch.stack(_generate(target, hs.SpecKVCache(sparse_prefill="on", **base), ids, mask, 2).logits)
    off = torch.stack(_generate(target, hs.SpecKVCache(sparse_prefill="off", **base), ids, mask, 2).logits)
    above = hs.SpecKVCache(sparse_prefill="auto", sparse_prefill_threshold=41, **base)  # 40 + 2 > 41
    below = hs.SpecKVCache(sparse_prefill="auto", sparse_prefill_threshold=42, **base)  # 42 is not > 42
    torch.testing.assert_close(torch.stack(_generate(target, above, ids, mask, 2).logits), on, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(_generate(target, below, ids, mask, 2).logits), off, atol=1e-5, rtol=0)


def test_sparse_prefill_defaults_follow_the_paper():
    config = hs.SpecKVConfig()
    assert (config.sparse_prefill, config.sparse_prefill_threshold) == ("auto", 4096)
    assert (config.prefill_vertical_size, config.prefill_window_size, config.prefill_block_size) == (2048, 2048, 64)
    assert hs.SnapKVConfig().sparse_prefill == "off"  # SnapKV's own method is dense; sparse is an option


def test_an_exception_in_the_sparse_prefill_leaves_the_model_as_it_was(monkeypatch):
    target = hs.bind(tiny_model("llama", seed=12, num_heads=4, num_kv_heads=2))
    before = {name: tensor.clone() for name, tensor in target.state_dict().items()}
    implementation = target.config._attn_implementation

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(hs.kernels.sparse_attention, "vertical_slash_attention", broken)
    ids, mask = random_batch(1, 40, [0], seed=13)
    cache = hs.SpecKVCache(lookahead_ids=torch.tensor([[4, 5]]), max_capacity_prompt=12, window_size=3, **{
        k: v for k, v in SPARSE.items()})
    with pytest.raises(RuntimeError, match="kernel failed"):
        _generate(target, cache, ids, mask, 2)
    assert target.config._attn_implementation == implementation and hs.is_bound(target)
    assert all(torch.equal(before[name], tensor) for name, tensor in target.state_dict().items())
    assert cache.get_seq_length() == 0 and not cache.layers


def test_models_that_cap_attention_logits_are_refused_before_any_work():
    target = hs.bind(tiny_model("llama", seed=14, num_heads=4, num_kv_heads=2))
    target.config.attn_logit_softcapping = 30.0  # what Gemma 2 sets; the sparse kernel does not cap
    ids, mask = random_batch(1, 40, [0], seed=15)
    calls = []
    handle = target.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="attn_logit_softcapping"):
            _generate(target, hs.SpecKVCache(lookahead_ids=torch.tensor([[4, 5]]), max_capacity_prompt=12,
                                             window_size=3, **SPARSE), ids, mask, 2)
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_sparse_prefill_without_eviction_keeps_every_position(family):
    """Issue 26, item 1: `max_capacity_prompt=None` (the official code's) runs the sparse prefill from the same scores
    and keeps every prompt position; the oracle's prefill rows see the vertical-slash mask, the later rows every
    prompt position."""
    target = hs.bind(tiny_model(family, seed=21, num_heads=4, num_kv_heads=2))
    ids, mask = random_batch(2, 48, [0, 6], seed=22)
    look = torch.tensor([[7, 8, 9]])
    knobs = dict(window_size=3, kernel_size=3, sparse_prefill="on", prefill_vertical_size=5, prefill_window_size=8,
                 prefill_block_size=4)
    cache = hs.SpecKVCache(lookahead_ids=look, max_capacity_prompt=None, **knobs)
    out = _generate(target, cache, ids, mask, new_tokens=3)
    expected, _ = sparse_oracle_logits(target, ids, mask, look.expand(2, -1), out.sequences[:, :-1], budget=None,
                                       window=3, kernel=3, vertical=5, band=8, block=4)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), expected[:, 47:], atol=1e-4, rtol=0)
    assert not cache.is_compressed and cache.get_seq_length() == 48 + 3 - 1
    full = [layer for layer in cache.layers if isinstance(layer, hs.CompressedKVLayer)]
    assert all(layer.num_rows == 47 + 3 for layer in full)
    # below the threshold nothing is sparse, so nothing runs but the ordinary prefill: no draft preview at all
    below = hs.SpecKVCache(lookahead_ids=look, max_capacity_prompt=None, **dict(knobs, sparse_prefill="auto"),
                           sparse_prefill_threshold=4096)
    plain = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                            pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    quiet = _generate(target, below, ids, mask, new_tokens=3)
    assert below.lookahead_ids is None
    torch.testing.assert_close(torch.stack(quiet.logits), torch.stack(plain.logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize("budget", [12, None], ids=["evicting", "no eviction"])
def test_a_batch_gives_every_row_what_it_would_get_alone(budget):
    """Issue 26, item 2: the sparse switch (`"auto"`) and the block alignment are decided per row, as the official
    code, which runs one row at a time, decides them. A batch of an unpadded row and a padded row that cross the
    threshold and a padded row that does not gives each row the greedy tokens and logits of that row alone."""
    target = hs.bind(tiny_model("llama", seed=12, num_heads=4, num_kv_heads=2))
    paddings = [0, 5, 14]
    ids, mask = random_batch(3, 48, paddings, seed=13)
    look = torch.tensor([[21, 22, 23]])
    knobs = dict(max_capacity_prompt=budget, window_size=3, kernel_size=3, lookahead_ids=look, sparse_prefill="auto",
                 sparse_prefill_threshold=40, prefill_vertical_size=4, prefill_window_size=8, prefill_block_size=4)
    # prompt + lookahead per row: 51 and 46 tokens cross 40 (sparse), 37 do not (dense); 5 is not a whole block
    batched = _generate(target, hs.SpecKVCache(**knobs), ids, mask, new_tokens=3)
    logits = torch.stack(batched.logits, dim=1)
    for row, pad in enumerate(paddings):
        alone = _generate(target, hs.SpecKVCache(**knobs), ids[row : row + 1, pad:], mask[row : row + 1, pad:], 3)
        assert torch.equal(batched.sequences[row, -3:], alone.sequences[0, -3:]), f"row {row}"
        torch.testing.assert_close(logits[row], torch.stack(alone.logits, dim=1)[0], atol=1e-4, rtol=0)


def test_the_official_guards_are_checked_before_any_work():
    """Issue 26, item 2: `C <= P_win + P_vert` and a band of whole blocks, where the sparse prefill can run."""
    with pytest.raises(ValueError, match="must not exceed `prefill_window_size \\+ prefill_vertical_size`"):
        hs.SpecKVConfig(max_capacity_prompt=5000)  # 2048 + 2048
    with pytest.raises(ValueError, match="multiple of `prefill_block_size`"):
        hs.SpecKVConfig(prefill_window_size=2000)
    hs.SpecKVConfig(max_capacity_prompt=5000, sparse_prefill="off")  # dense: no guard
    with pytest.raises(ValueError, match="needs a budget"):
        hs.SnapKVConfig(max_capacity_prompt=None)
