"""Each method's defaults behave as its reference does (docs/fidelity.md), pinned on small hand-computed cases."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers import GenerationMixin

import hf_specapprox as hs
from hf_specapprox import compat
from hf_specapprox.config import resolve_specpc_kernel_size
from hf_specapprox.modeling.draft import generate_lookahead
from hf_specapprox.prompt.baselines import generate_advances_position_ids
from hf_specapprox.prompt.scorers import TokenScorer, TokenScores
from hf_specapprox.integrations.registry import get_method
from hf_specapprox_eval.methods import method_configs, run_method
from tiny_models import EOS_ID, random_batch, tiny_model

# ---------------------------------------------------------------------------------------------------------------
# 1. The draft's preview is what `draft.generate(do_sample=False)` writes with the draft's generation config (it is
#    that call now; the oracle is a hand-written loop).


def penalised_draft(penalty: float = 3.0, **kwargs):
    draft = tiny_model("llama", seed=11, **kwargs)
    draft.generation_config.repetition_penalty = penalty  # as Qwen2.5-Instruct's generation_config.json does
    return draft


@torch.no_grad()
def oracle_tokens(draft, ids, mask, n):
    """The independent oracle: a greedy loop written here (full forwards, no cache) that applies the draft's
    repetition penalty by hand, as Qwen2.5-Instruct's generation config asks (CTRL's rule: every id seen so far,
    padding included, has its positive logit divided by the penalty and its negative one multiplied)."""
    penalty = draft.generation_config.repetition_penalty or 1.0
    # transformers' own `generate` leaves the left padding out of the penalty where it passes the padding lengths to
    # the processor (`prompt_ignore_length`, 5.x); before, the padding ids count as seen
    skips_padding = "prompt_ignore_length=" in inspect.getsource(GenerationMixin._get_logits_processor)
    sequence, valid = ids, mask
    for _ in range(n):
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        logits = draft(input_ids=sequence, attention_mask=valid, position_ids=positions).logits[:, -1].float()
        seen_ids = torch.where(valid.bool(), sequence, sequence[:, -1:]) if skips_padding else sequence
        seen = torch.gather(logits, 1, seen_ids)
        logits = logits.scatter(1, seen_ids, torch.where(seen < 0, seen * penalty, seen / penalty))
        token = logits.argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
        valid = torch.cat([valid, torch.ones_like(token)], dim=1)
    return sequence[:, ids.shape[1]:]


def assert_same_valid_tokens(tokens, valid, expected):
    assert tokens.shape[1] == expected.shape[1]
    assert torch.equal(tokens[valid], expected[valid])


@torch.no_grad()
def test_preview_applies_the_generation_config_processors_and_equals_generate():
    draft = penalised_draft()
    ids, mask = random_batch(2, 12, [0, 3], seed=12)
    n = 10
    tokens, valid = generate_lookahead(draft, ids, mask, n)
    assert_same_valid_tokens(tokens, valid, oracle_tokens(draft, ids, mask, n))
    bare, bare_valid = generate_lookahead(draft, ids, mask, n, decoding="argmax")
    assert not torch.equal(tokens, bare)  # the penalty changes the preview
    # argmax is the bare greedy loop: generate with the penalty switched off
    draft.generation_config.repetition_penalty = 1.0
    assert_same_valid_tokens(bare, bare_valid, oracle_tokens(draft, ids, mask, n))


@torch.no_grad()
def test_speckv_and_specpc_previews_equal_generate():
    draft = penalised_draft()
    ids, mask = random_batch(1, 40, [0], seed=13)
    n = 8
    expected = oracle_tokens(draft, ids, mask, n)
    cache = hs.SpecKVCache(draft=draft, max_capacity_prompt=16, window_size=4, lookahead_tokens=n)
    assert cache.config.lookahead_decoding == "generation_config"
    tokens, valid = cache.query_source.tokens(None, ids, mask, cache.config)
    assert_same_valid_tokens(tokens, valid, expected)
    # SpecPC's votes come from an observer set around the draft's `generate`: the tokens are the same
    specpc = hs.SpecPCPreprocessor(draft, max_capacity_prompt=16, window_size=4, lookahead_tokens=n,
                                   starting_layer_index=0)
    out = specpc(ids, mask)
    assert_same_valid_tokens(out.draft_tokens, out.draft_tokens_valid, expected)
    argmax = hs.SpecPCPreprocessor(draft, max_capacity_prompt=16, window_size=4, lookahead_tokens=n,
                                   starting_layer_index=0, lookahead_decoding="argmax")(ids, mask)
    assert not torch.equal(argmax.draft_tokens, out.draft_tokens)


@torch.no_grad()
def test_preview_keeps_the_eos_and_invalidates_what_follows():
    draft = penalised_draft()
    ids, mask = random_batch(1, 12, [0], seed=12)
    first = oracle_tokens(draft, ids, mask, 3)[0, 2].item()
    draft.generation_config.eos_token_id = [EOS_ID, first]  # the third token becomes an EOS
    tokens, valid = generate_lookahead(draft, ids, mask, 6)
    assert tokens[0, 2].item() == first and valid[0].tolist()[:3] == [True, True, True]
    assert not valid[0, 3:].any()


def test_lookahead_decoding_is_checked():
    with pytest.raises(ValueError, match="lookahead_decoding"):
        hs.SpecKVConfig(lookahead_decoding="beam")
    with pytest.raises(ValueError, match="lookahead_decoding"):
        hs.SpecPCConfig(lookahead_decoding="sample")


@torch.no_grad()
def test_harness_runs_the_target_with_its_generation_config():
    target = tiny_model("llama", seed=21)
    target.generation_config.repetition_penalty = 3.0
    ids, mask = random_batch(1, 20, [0], seed=22)
    tokens, _ = run_method("full", target, None, ids, mask, budget=None, max_new_tokens=8)
    assert torch.equal(tokens, oracle_tokens(target, ids, mask, 8))
    plain = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                            repetition_penalty=1.0, pad_token_id=0)[:, 20:]
    assert not torch.equal(tokens, plain)


# ---------------------------------------------------------------------------------------------------------------
# 2. SpecPC's kernel (and neighbours) per draft family, as released.


def spiked_specpc(family: str, **knobs):
    """A SpecPC whose draft votes one spike at position 100 of a 200-token prompt (everything else 0)."""
    specpc = hs.SpecPCPreprocessor(tiny_model(family, seed=1), max_capacity_prompt=67, window_size=4,
                                   starting_layer_index=0, **knobs)
    scores = torch.zeros(1, 200)
    scores[0, 100] = 1.0
    specpc.token_scorer = FixedScores(scores)  # the public seam: a token scorer of one's own
    return specpc


class FixedScores(TokenScorer):
    def __init__(self, scores):
        self.scores = scores

    def score(self, draft, input_ids, attention_mask, config):
        return TokenScores.without_draft(self.scores)


def test_specpc_kernel_resolves_per_draft_family_and_selects_accordingly():
    ids, mask = random_batch(1, 200, [0], seed=2)
    window = list(range(196, 200))
    # Budget 67 = the window (4) + 63. Kernel k, neighbours k: zero padding ((k-1)//2, rest) makes positions
    # 100-k//2 .. 100+(k-1)//2 a plateau; ties go to the earlier position, so the first ranked token is 100 - k//2
    # and its neighbours come nearest first (offsets 0, -1, +1, ..., from -(k-1)//2 to k//2).
    # k = 32: token 84 brings 69..100 (32), then plateau tokens 85..115 one new position each, 101..131 (31).
    llama = spiked_specpc("llama")
    assert llama.config.kernel_size == 32 and llama.config.resolved_neighbor_tokens == 32
    assert llama(ids, mask).kept_indices[0].tolist() == list(range(69, 132)) + window
    # k = 64: token 68 alone brings 63 positions, offsets 0, -1, +1, ..., -31, +31: 37..99.
    qwen = spiked_specpc("qwen2")
    assert qwen.config.kernel_size == 64
    assert qwen(ids, mask).kept_indices[0].tolist() == list(range(37, 100)) + window
    assert spiked_specpc("mistral").config.kernel_size == 64  # any other family: the official default
    explicit = spiked_specpc("llama", kernel_size=64)  # an explicit value wins
    assert explicit.config.kernel_size == 64
    assert explicit(ids, mask).kept_indices[0].tolist() == list(range(37, 100)) + window


def test_specpc_kernel_resolution_leaves_the_given_config_alone():
    config = hs.SpecPCConfig(starting_layer_index=0)
    specpc = hs.SpecPCPreprocessor(tiny_model("llama"), config=config)
    assert config.kernel_size is None and specpc.config.kernel_size == 32
    specpc.config.kernel_size = None  # edited back: resolved again at use
    ids, mask = random_batch(1, 30, [0])
    specpc(ids, mask)
    assert specpc.config.kernel_size == 32
    assert resolve_specpc_kernel_size(tiny_model("qwen3")) == 64


# ---------------------------------------------------------------------------------------------------------------
# 3. SpecKV-PC: the released configuration in the library and the harness.


@torch.no_grad()
def test_harness_speckv_pc_is_the_released_configuration():
    draft = tiny_model("llama", seed=3)
    configs = method_configs("speckv_pc", draft, budget=16, max_new_tokens=64)
    pc = configs["specpc_config"]
    assert (pc.max_capacity_prompt, pc.window_size, pc.kernel_size, pc.lookahead_tokens) == (2048, 64, 32, 20)
    assert configs["speckv_config"].max_capacity_prompt == 16
    cascade = hs.SpecKVPC(tiny_model("llama", seed=3, num_layers=9))  # the released voting layers (8 on) exist
    assert (cascade.specpc.config.max_capacity_prompt, cascade.specpc.config.kernel_size,
            cascade.specpc.config.lookahead_tokens, cascade.speckv_config.max_capacity_prompt) == (2048, 32, 20, 256)
    # SpecPC to 40 tokens with a 20-token preview, then SpecKV reusing exactly those tokens
    target = tiny_model("llama", seed=4)
    configs = method_configs("speckv_pc", draft, budget=16, max_new_tokens=64, pc_budget=40)
    configs["specpc_config"].starting_layer_index = 0
    ids, mask = random_batch(1, 90, [0], seed=5)
    prepared = get_method("speckv_pc").build(draft, **configs)(target, ids, mask)
    expected, expected_valid = generate_lookahead(draft, ids, mask, 20)
    assert torch.equal(prepared.compressed.draft_tokens, expected)
    assert prepared.compressed.kept_lengths.tolist() == [40]
    reused, _ = prepared.cache.fixed_lookahead
    assert torch.equal(reused, expected)


# ---------------------------------------------------------------------------------------------------------------
# 4. SpecPrefill as its own code does it.


@torch.no_grad()
def test_specprefill_scores_are_pooled_lookahead_attention_over_the_prompt():
    draft = tiny_model("llama", seed=3, num_layers=2, attn_implementation="eager")
    ids, mask = random_batch(1, 40, [0], seed=4)
    specprefill = hs.SpecPrefillPreprocessor(draft, max_capacity_prompt=12, keep_original_positions=False,
                                             lookahead_tokens=3)
    assert (specprefill.chunk_size, specprefill.pool_kernel_size) == (32, 13)
    out = specprefill(ids, mask)
    assert out.draft_tokens.shape[1] == 3 and bool(out.draft_tokens_valid.all())
    # Reference: one forward over prompt + the first 2 draft tokens; the queries of the last prompt token and of the
    # two draft tokens, their attention renormalised over the prompt keys, avg-pooled (13, zero padding) per layer
    # and head, max over layers and heads, mean over the three queries.
    sequence = torch.cat([ids, out.draft_tokens[:, :2]], dim=1)
    attentions = draft(input_ids=sequence, output_attentions=True).attentions
    rows = torch.stack([a[0, :, 39:42, :40] for a in attentions])  # (layers, heads, 3, 40)
    rows = rows / rows.sum(-1, keepdim=True)
    pooled = F.avg_pool1d(rows.reshape(-1, 1, 40), kernel_size=13, stride=1, padding=6).reshape(rows.shape)
    expected = pooled.amax(dim=(0, 1)).mean(0)
    torch.testing.assert_close(out.token_scores[0], expected, atol=1e-6, rtol=1e-5)


def test_specprefill_ranks_chunks_by_mean_and_keeps_the_last_token():
    draft = tiny_model("llama", seed=3)
    specprefill = hs.SpecPrefillPreprocessor(draft, max_capacity_prompt=5, chunk_size=4,
                                             keep_original_positions=False)
    # chunks [0-3] mean 0.5, [4-7] mean 0.25, [8-9] mean 0: the last token (9) and the best chunk are kept
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    specprefill.token_scorer = FixedScores(scores)
    ids, mask = random_batch(1, 10, [0], seed=6)
    assert specprefill(ids, mask).kept_indices[0].tolist() == [0, 1, 2, 3, 9]


@torch.no_grad()
def test_specprefill_gives_the_target_the_original_positions():
    target, draft = tiny_model("llama", seed=7), tiny_model("llama", seed=8)
    ids, mask = random_batch(2, 50, [0, 6], seed=9)
    if not generate_advances_position_ids():
        with pytest.raises(NotImplementedError, match="keep_original_positions=False"):
            hs.SpecPrefillPreprocessor(draft, max_capacity_prompt=20)
        return
    out = hs.SpecPrefillPreprocessor(draft, max_capacity_prompt=20, chunk_size=8)(ids, mask)
    for row, kept in enumerate(out.kept_indices):
        assert out.position_ids[row, -len(kept):].tolist() == kept.tolist()
        assert kept[-1].item() == int(mask[row].sum()) - 1
    generated = target.generate(**out.model_inputs, do_sample=False, max_new_tokens=4, pad_token_id=0)
    generated = generated[:, out.input_ids.shape[1]:]
    # Oracle, one row at a time: the kept tokens at their original positions, then decoding from the prompt's length
    for row, kept in enumerate(out.kept_indices):
        real = ids[row, mask[row].bool()]
        step_ids, positions, cache, tokens = real[kept][None], kept[None], DynamicCache(), []
        for _ in range(4):
            logits = target(input_ids=step_ids, position_ids=positions, use_cache=True,
                            **{compat.cache_kwarg_name(target): cache}).logits[:, -1]
            tokens.append(int(logits.argmax(-1)))
            step_ids, positions = torch.tensor([[tokens[-1]]]), positions[:, -1:] + 1
        ends = [i for i, token in enumerate(tokens) if token == EOS_ID]
        upto = ends[0] + 1 if ends else len(tokens)  # generate pads after the EOS
        assert generated[row, :upto].tolist() == tokens[:upto]


# ---------------------------------------------------------------------------------------------------------------
# 5. SnapKV as its own code does it; kvpress's variant by name.


def snapkv_reference(attentions, length, window, kept_per_head, pool):
    """SnapKV on a GQA model, per KV head: the window rows' attention over the candidates, mean over the window and
    the group's query heads, pooled (width 7), the best `kept_per_head` candidates in position order."""
    per_layer = []
    for attention in attentions:
        rows = attention[0, :, length - window:, : length - window]  # (heads, window, candidates)
        grouped = rows.reshape(2, -1, window, length - window).mean(dim=(1, 2))  # 2 KV heads
        pooled = (F.max_pool1d if pool == "max" else F.avg_pool1d)(grouped[:, None], 7, 1, 3)[:, 0]
        order = torch.sort(pooled, dim=-1, descending=True, stable=True).indices[:, :kept_per_head]
        per_layer.append(order.sort(-1).values)
    return per_layer


@torch.no_grad()
def test_snapkv_default_max_pools_and_kvpress_variant_average_pools():
    assert (hs.SnapKVConfig().pool_type, hs.SnapKVConfig().kernel_size, hs.SnapKVConfig().window_size) == ("max", 7, 32)
    press = hs.SnapKVConfig.kvpress(max_capacity_prompt=100)
    assert (press.window_size, press.kernel_size, press.pool_type, press.max_capacity_prompt) == (64, 5, "mean", 100)
    target = tiny_model("llama", seed=5, num_heads=4, num_kv_heads=2, attn_implementation="eager")
    length, window, budget = 48, 4, 12
    ids, mask = random_batch(1, length, [0], seed=6)
    attentions = target(input_ids=ids, output_attentions=True).attentions
    kept = {}
    for pool in ("max", "mean"):
        cache = hs.SnapKVCache(model=target, max_capacity_prompt=budget, window_size=window, pool_type=pool)
        target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0,
                        **{compat.cache_kwarg_name(target): cache})
        chosen = [cache.kept_positions(layer)[0] for layer in range(len(attentions))]
        candidates = [c[c < length - window].reshape(2, -1) for c in chosen]
        expected = snapkv_reference(attentions, length, window, candidates[0].shape[-1], pool)
        for ours, theirs in zip(candidates, expected):
            assert torch.equal(ours, theirs)
        kept[pool] = candidates
    hs.unbind(target)
    assert any(not torch.equal(a, b) for a, b in zip(kept["max"], kept["mean"]))


def test_specprefill_decodes_its_draft_as_its_own_code_does():
    """Issue 26, item 4: SpecPrefill's code runs its draft on vLLM with no Hugging Face generation config: the bare
    argmax, whatever the checkpoint's repetition penalty; the other reading stays available by name."""
    draft = penalised_draft()
    # original positions need a `generate` that advances custom position ids (transformers 5.x); 4.x refuses them
    original = generate_advances_position_ids()
    assert hs.SpecPrefillPreprocessor(draft, keep_original_positions=original).config.lookahead_decoding == "argmax"
    assert get_method("specprefill").default_configs()["specpc_config"].lookahead_decoding == "argmax"
    harness = method_configs("specprefill", draft, budget=64, max_new_tokens=8)["specpc_config"]
    assert harness.lookahead_decoding == "argmax"
    ids, mask = random_batch(1, 40, [0], seed=31)
    bare = hs.SpecPrefillPreprocessor(draft, max_capacity_prompt=16, keep_original_positions=False)(ids, mask)
    draft.generation_config.repetition_penalty = 1.0
    expected = oracle_tokens(draft, ids, mask, 8)  # the hand-written greedy loop, no penalty
    assert torch.equal(bare.draft_tokens, expected)
    if not original:
        return
    tokens, _ = run_method("specprefill+genconfig", tiny_model("llama", seed=21), penalised_draft(), ids, mask,
                           budget=16, max_new_tokens=4)
    assert tokens.shape == (1, 4)
