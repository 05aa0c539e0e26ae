"""The misuse findings of issue 27 (a 361-attempt run on the second wave's main): one test per item, each of which
failed before its fix. Item numbers refer to the issue. The serving client's items live in `test_serving.py`, the
CLI's in `test_cli.py`, the config round trip in `test_config_serialization.py`, concurrent calls on one cache in
`test_retained_context.py`."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from transformers import DynamicCache, pipeline

import hf_specapprox as hs
from hf_specapprox.modeling.capture import has_scoring_attention
from oracle import continuation_keeps_the_cache
from test_oracle import assert_matches_oracle
from tiny_models import PAD_ID, random_batch, tiny_model, tiny_tokenizer, words

KNOBS = dict(max_capacity_prompt=12, window_size=3, lookahead_tokens=4)
GEN = dict(pad_token_id=PAD_ID, do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.fixture(scope="module")
def models():
    return hs.bind(tiny_model("qwen2", seed=51, num_heads=4, num_kv_heads=2)), tiny_model("llama", seed=52,
                                                                                          num_layers=1)


def run(target, cache, ids, mask, new_tokens=3, **kwargs):
    return target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, **{**GEN, **kwargs})


def unbound_copy(model):
    target = copy.deepcopy(model)
    hs.unbind(target)
    return target


# 2. SpecPC from several threads on one unbound draft --------------------------------------------------------------
def test_specpc_from_threads_on_one_unbound_draft_is_exact():
    """Before: 3-7 of 32 calls kept other prompt tokens silently (the second thread's layers stopped voting when the
    first restored the draft's attention)."""
    draft = tiny_model("llama", seed=53, num_layers=2)
    specpc = hs.SpecPCPreprocessor(draft, max_capacity_prompt=12, window_size=3, kernel_size=3,
                                   starting_layer_index=0, lookahead_tokens=3)
    prompts = [random_batch(1, 40, [0], seed=seed) for seed in range(4)]
    expected = [specpc(ids, mask).kept_indices[0] for ids, mask in prompts]
    implementation = draft.config._attn_implementation
    errors, mismatches = [], []

    def compress(index):
        try:
            for _ in range(8):
                kept = specpc(*prompts[index]).kept_indices[0]
                if not torch.equal(kept, expected[index]):
                    mismatches.append(index)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=compress, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not mismatches
    assert draft.config._attn_implementation == implementation  # the last one out restored it


# 3. Continuation decided on exact ids ------------------------------------------------------------------------------
def test_a_near_identical_token_is_never_taken_for_the_one_fed(models):
    """Before: after forwards the cache never saw (an unbound model), continuation was accepted when recomputed
    layer-0 keys matched within 1 % — a token with a near-identical embedding passed, and the answer diverged."""
    bound, draft = models
    target = unbound_copy(bound)
    with torch.no_grad():
        embeddings = target.get_input_embeddings().weight
        embeddings[9] = embeddings[8] * 1.002  # token 9 is token 8 within 0.2 %
    ids, mask = random_batch(1, 30, [0], seed=54)
    cache = hs.SpecKVCache(draft=draft, **KNOBS)
    cache.prepare_prefill(target, ids, {"attention_mask": mask})
    first = run(target, cache, ids, mask, new_tokens=2).sequences
    follow = torch.cat([first, torch.tensor([[8]])], dim=1)
    follow[0, -2] = 9 if first[0, -2] != 9 else 8  # a generated token replaced by its near twin
    follow_mask = torch.ones_like(follow)
    cache.prepare_prefill(target, follow, {"attention_mask": follow_mask})
    fresh = hs.SpecKVCache(draft=draft, **KNOBS)
    fresh.prepare_prefill(target, follow, {"attention_mask": follow_mask})
    assert torch.equal(run(target, cache, follow, follow_mask).sequences,
                       run(target, fresh, follow, follow_mask).sequences)


# 4. and 17. The pipeline and a cache or an assistant given per call -----------------------------------------------
@pytest.fixture
def pipe(models):
    target, draft = models
    return pipeline("speckv-text-generation", model=target, tokenizer=tiny_tokenizer(), draft_model=draft,
                    speckv_config=hs.SpecKVConfig(max_capacity_prompt=12, window_size=3, lookahead_tokens=4))


def test_the_pipeline_uses_a_cache_given_per_call(pipe, models):
    """Before: `pipe(prompt, cache=my_cache)` silently used the pipeline's own fresh cache (budget 12, not 30)."""
    target, draft = models
    prompt = words(60)
    mine = hs.SpecKVCache(draft=draft, max_capacity_prompt=30, window_size=3, lookahead_tokens=4)
    out = pipe(prompt, cache=mine, max_new_tokens=3, do_sample=False)[0]
    assert out["hf_specapprox"]["kv_kept_per_layer"] == 30 and mine.is_compressed
    other = hs.SpecKVCache(draft=draft, max_capacity_prompt=30, window_size=3, lookahead_tokens=4)
    assert pipe(prompt, past_key_values=other, max_new_tokens=3, do_sample=False)[0]["generated_text"] == \
        out["generated_text"]
    with pytest.raises(ValueError, match="cannot use the given cache"):
        pipe(prompt, cache=DynamicCache(), max_new_tokens=3)  # a KV method needs a compressing cache
    with pytest.raises(ValueError, match="cannot use the given cache"):
        pipe(prompt, cache=mine, method="specpc", max_new_tokens=3)


def test_the_pipeline_refuses_an_assistant_per_call(pipe, models):
    """Before: `pipe(prompt, assistant_model=draft)` switched on assisted decoding; the constructor refused it."""
    _, draft = models
    with pytest.raises(ValueError, match="draft_model="):
        pipe(words(60), assistant_model=draft, max_new_tokens=3)


def test_the_pipeline_answers_questions_about_one_context(pipe, models):
    target, draft = models
    context = words(80)
    questions = [" " + words(4, seed=index) for index in range(3)]
    answers = pipe(context, questions=questions, max_new_tokens=3, do_sample=False)
    assert len(answers) == 3
    for question, answer in zip(questions, answers):
        assert answer == pipe(context + question, max_new_tokens=3, do_sample=False)
    full = pipe(context, questions=questions[0], method="full", max_new_tokens=3, do_sample=False)
    assert full == pipe(context + questions[0], method="full", max_new_tokens=3, do_sample=False)


# 5. bind, then set_attn_implementation ----------------------------------------------------------------------------
def test_bind_follows_a_later_attention_switch_and_unbind_keeps_it():
    """Before: after `bind` then `set_attn_implementation("eager")` the wrapper was gone but `is_bound` said True,
    the advice to call `bind` did nothing, and `unbind` silently restored "sdpa"."""
    target = hs.bind(tiny_model("llama", seed=55))
    target.set_attn_implementation("eager")
    assert not has_scoring_attention(target)
    ids, mask = random_batch(1, 30, [0], seed=56)
    cache = hs.SnapKVCache(max_capacity_prompt=12, window_size=3, layer_budgets="pyramid")
    with pytest.raises(ValueError, match=r"again, after `set_attn_implementation`"):
        run(target, cache, ids, mask)
    hs.bind(target)  # the advice works: the wrapper now wraps eager
    assert has_scoring_attention(target)
    out = run(target, cache, ids, mask)
    assert_matches_oracle(target, cache, ids, mask, out)
    target.set_attn_implementation("sdpa")
    hs.unbind(target)
    assert target.config._attn_implementation == "sdpa"  # the user's later choice stays


# 12. Static decoding on a bound model, a prompt that fits ---------------------------------------------------------
def test_a_static_cache_serves_a_prompt_that_fits_the_budget(models):
    """Before: "needs a 2-D padding mask, got a 4-D mask" on a shared static cache's first short prompt."""
    target, draft = models
    ids, mask = random_batch(1, 8, [0], seed=57)
    cache = hs.SnapKVCache(max_capacity_prompt=12, window_size=3).use_static_decode(4)
    out = run(target, cache, ids, mask, new_tokens=4)
    plain = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, **GEN)
    assert torch.equal(out.sequences, plain.sequences)


# 13. expand_size --------------------------------------------------------------------------------------------------
def test_expand_size_is_checked_named_and_applied(models):
    """Before: a wrong `expand_size` gave a raw shape error deep in a layer, a second call with the right one was a
    silent no-op, 2.0 / "3" gave raw TypeErrors and True was taken as 1."""
    bound, draft = models
    target = unbound_copy(bound)
    ids, mask = random_batch(1, 30, [0], seed=58)
    beams = dict(num_beams=3, max_new_tokens=3, do_sample=False, pad_token_id=PAD_ID)
    for bad in (2.0, "3", True):
        with pytest.raises(TypeError, match="expand_size"):
            hs.SpecKVCache(draft=draft, **KNOBS).prepare_prefill(target, ids, {"attention_mask": mask},
                                                                  expand_size=bad)
    cache = hs.SpecKVCache(draft=draft, **KNOBS)
    cache.prepare_prefill(target, ids, {"attention_mask": mask})
    if continuation_keeps_the_cache():  # (transformers' native hook hands the cache the expanded ids itself)
        with pytest.raises(ValueError, match="expand_size"):
            target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **beams)
    cache = hs.SpecKVCache(draft=draft, **KNOBS)
    cache.prepare_prefill(target, ids, {"attention_mask": mask})
    cache.prepare_prefill(target, ids, {"attention_mask": mask}, expand_size=3)  # applied, not a no-op
    out = target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **beams)
    expected = bound.generate(input_ids=ids, attention_mask=mask, past_key_values=hs.SpecKVCache(draft=draft, **KNOBS),
                              **beams)
    assert torch.equal(out, expected)


# 14. One returned sequence after beams --------------------------------------------------------------------------
def test_a_greedy_call_on_one_returned_sequence_is_a_fresh_prompt(models):
    """Before: taken as a continuation of both beam rows ("holds 2 rows, the forward has 1")."""
    target, draft = models
    ids, mask = random_batch(1, 30, [0], seed=59)
    cache = hs.SpecKVCache(draft=draft, **KNOBS)
    out = target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, num_beams=2,
                          num_return_sequences=2, max_new_tokens=3, do_sample=False, pad_token_id=PAD_ID)
    one = out[:1]
    again = run(target, cache, one, torch.ones_like(one))
    assert torch.equal(again.sequences, run(target, hs.SpecKVCache(draft=draft, **KNOBS), one,
                                            torch.ones_like(one)).sequences)


# 16. A cache filled for another model -------------------------------------------------------------------------------
def test_a_cache_filled_for_another_model_says_so(models):
    """Before: `IndexError: list index out of range` (2-layer cache, 3-layer model); a same-shaped other model
    silently answered from the wrong K/V."""
    target, draft = models
    ids, mask = random_batch(1, 30, [0], seed=60)
    cache = hs.SpecKVCache(draft=draft, **KNOBS)
    first = run(target, cache, ids, mask)
    deeper = tiny_model("qwen2", seed=61, num_heads=4, num_kv_heads=2, num_layers=3)
    with pytest.raises(ValueError, match="filled for a model with 2 cache layers"):
        deeper(input_ids=first.sequences[:, -1:], past_key_values=cache)
    twin = hs.bind(tiny_model("qwen2", seed=62, num_heads=4, num_kv_heads=2))  # same shapes, other weights
    follow = torch.cat([first.sequences, torch.tensor([[7]])], dim=1)
    served = run(twin, cache, follow, torch.ones_like(follow))
    assert torch.equal(served.sequences, run(twin, hs.SpecKVCache(draft=draft, **KNOBS), follow,
                                             torch.ones_like(follow)).sequences)


# 19. use_static_decode(None) mid-conversation -------------------------------------------------------------------
def test_switching_static_decoding_off_converts_the_layers(models):
    """Before: continuing after `use_static_decode(None)` overflowed with the advice to call it."""
    target, draft = models
    ids, mask = random_batch(1, 30, [0], seed=63)
    cache = hs.SnapKVCache(max_capacity_prompt=12, window_size=3).use_static_decode(3)
    first = run(target, cache, ids, mask, new_tokens=3)
    cache.use_static_decode(None)
    assert not cache.is_static
    follow = torch.cat([first.sequences, torch.tensor([[7, 8]])], dim=1)
    out = run(target, cache, follow, torch.ones_like(follow), new_tokens=6)
    reference = hs.SnapKVCache(max_capacity_prompt=12, window_size=3)
    run(target, reference, ids, mask, new_tokens=3)
    assert torch.equal(out.sequences, run(target, reference, follow, torch.ones_like(follow), new_tokens=6).sequences)


# 21. Empty caches ---------------------------------------------------------------------------------------------------
def test_row_operations_on_an_empty_cache_are_no_ops(models):
    """Before: raw `RuntimeError` / `IndexError` (DynamicCache treats both as no-ops)."""
    target, draft = models
    for cache in (hs.SpecKVCache(draft=draft, **KNOBS), hs.SnapKVCache(max_capacity_prompt=12, window_size=3)):
        cache.reorder_cache(torch.tensor([0]))
        cache.batch_select_indices(torch.tensor([0]))
        ids, mask = random_batch(1, 30, [0], seed=64)
        run(target, cache, ids, mask)
        cache.reset()
        cache.reorder_cache(torch.tensor([0]))
        cache.batch_select_indices(torch.tensor([0]))
        assert cache.get_seq_length() == 0


# Issue 24, item 7: renamed public names keep a deprecated alias for one minor version -----------------------------
def test_renamed_public_names_still_work_with_a_future_warning():
    with pytest.warns(FutureWarning, match="KVCompressionCache"):
        assert hs.PromptCompressionCache is hs.KVCompressionCache
    with pytest.warns(FutureWarning, match="resolved_neighbor_tokens"):
        assert hs.SpecPCConfig(kernel_size=5).neighbours == 5
    target, draft = hs.bind(tiny_model("llama", seed=81)), tiny_model("llama", seed=82, num_layers=1)
    ids, mask = random_batch(1, 40, [0], seed=83)
    cascade = hs.SpecKVPC(draft, hs.SpecPCConfig(max_capacity_prompt=24, window_size=4, kernel_size=3,
                                                 starting_layer_index=0, lookahead_tokens=3),
                          hs.SpecKVConfig(max_capacity_prompt=12, window_size=3))
    compressed, out = cascade.compress_and_generate(target, ids, mask, max_new_tokens=3, do_sample=False)
    with pytest.warns(FutureWarning, match="compress_and_generate"):
        old_out, old_compressed = cascade.generate(target, ids, mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(old_out, out) and torch.equal(old_compressed.input_ids, compressed.input_ids)
