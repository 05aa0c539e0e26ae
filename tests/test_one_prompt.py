"""One generate call, one prompt: a cache object reused across prompts answers each exactly as a fresh cache would,
the explicit prefill step, and every setting a compressing cache cannot serve refused before any work.

Each test reproduces a failure seen with the first binding (which guessed "new prompt or continuation?" from a single
forward's inputs) and checks the answer against a fresh cache and the masked-attention oracle.
"""

from __future__ import annotations

import copy
import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig, pipeline

import hf_specapprox as hs
from hf_specapprox.testing import tiny_tokenizer, words
from oracle import continuation_keeps_the_cache, oracle_logits
from test_oracle import assert_matches_oracle
from tiny_models import FAMILIES, random_batch, tiny_model

GEN = dict(pad_token_id=0, do_sample=False, return_dict_in_generate=True, output_logits=True)
KNOBS = dict(max_capacity_prompt=12, window_size=3, lookahead_tokens=4)


class CallCounter:
    """Counts forwards of a module (a forward pre-hook), to prove that a refusal came before any work."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1


@pytest.fixture(scope="module")
def models():
    target = tiny_model("qwen2", seed=21, num_heads=4, num_kv_heads=2)
    draft = tiny_model("llama", seed=22, num_layers=1)
    return hs.bind(target), draft


def run(target, cache, ids, mask, new_tokens=3):
    return target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, **GEN)


def assert_same(actual, expected):
    assert torch.equal(actual.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(actual.logits), torch.stack(expected.logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("second", [(1, 40, [0]), (1, 20, [0]), (1, 30, [0]), (2, 44, [0, 6]), (3, 26, [2, 0, 9])])
def test_a_used_cache_answers_a_new_prompt_as_a_fresh_cache(models, second):
    """Longer, shorter, equal, batched, padded: the second prompt is never taken for a continuation of the first."""
    target, draft = models
    cache = hs.SpecKVCache(draft=draft, **KNOBS)
    ids, mask = random_batch(1, 30, [0], seed=1)
    run(target, cache, ids, mask)
    batch, length, paddings = second
    other, other_mask = random_batch(batch, length, paddings, seed=2)
    reused = run(target, cache, other, other_mask)
    fresh_cache = hs.SpecKVCache(draft=draft, **KNOBS)
    assert_same(reused, run(target, fresh_cache, other, other_mask))
    assert_matches_oracle(target, cache, other, other_mask, reused)


def test_a_batch_that_extends_the_old_prompt_is_still_a_new_prompt(models):
    """A new batch whose first row starts with the old prompt is not a continuation unless every row continues."""
    target, draft = models
    ids, mask = random_batch(2, 30, [0, 0], seed=3)
    cache = hs.SpecKVCache(draft=draft, **KNOBS)
    first = run(target, cache, ids, mask)
    longer = torch.cat([first.sequences, torch.full((2, 2), 7)], dim=1)
    longer[1, 5] = (longer[1, 5] + 1) % 90 + 3  # row 1 differs from what the cache consumed
    longer_mask = torch.ones_like(longer)
    reused = run(target, cache, longer, longer_mask)
    assert_same(reused, run(target, hs.SpecKVCache(draft=draft, **KNOBS), longer, longer_mask))


def test_the_stock_text_generation_pipeline_with_one_shared_cache_equals_fresh_caches(models):
    target, draft = models
    tokenizer = tiny_tokenizer()
    pipe = pipeline("text-generation", model=target, tokenizer=tokenizer, device="cpu")
    prompts = [words(30, seed=1), words(42, seed=2), words(18, seed=3), words(30, seed=4)]
    cache_name = hs.compat.cache_kwarg_name(target)
    shared = hs.SpecKVCache(draft=draft, **KNOBS)
    kwargs = dict(max_new_tokens=4, do_sample=False, return_full_text=False)
    with_shared = [pipe(prompt, **{cache_name: shared}, **kwargs)[0]["generated_text"] for prompt in prompts]
    with_fresh = [pipe(prompt, **{cache_name: hs.SpecKVCache(draft=draft, **KNOBS)}, **kwargs)[0]["generated_text"]
                  for prompt in prompts]
    assert with_shared == with_fresh


def test_prepare_prefill_then_stock_generate_on_an_unbound_model(models):
    """The explicit step: fill the cache, then transformers' own generate (no binding) continues from it exactly."""
    bound, draft = models
    target = copy.deepcopy(bound)
    hs.unbind(target)
    assert not hs.is_bound(target)
    ids, mask = random_batch(2, 30, [0, 4], seed=4)
    expected_cache = hs.SpecKVCache(draft=draft, **KNOBS)
    expected = run(bound, expected_cache, ids, mask)
    cache = hs.SpecKVCache(draft=draft, **KNOBS)
    cache.prepare_prefill(target, ids, {"attention_mask": mask})
    assert cache.get_seq_length() == 29 and cache.is_compressed
    actual = run(target, cache, ids, mask)
    assert_same(actual, expected)
    assert_matches_oracle(target, cache, ids, mask, actual)


def test_prepare_prefill_expands_for_beams_and_return_sequences(models):
    bound, draft = models
    target = copy.deepcopy(bound)
    hs.unbind(target)
    ids, mask = random_batch(2, 30, [0, 4], seed=5)
    kwargs = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0)
    expected = bound.generate(input_ids=ids, attention_mask=mask, past_key_values=hs.SpecKVCache(draft=draft, **KNOBS),
                              **kwargs)
    cache = hs.SpecKVCache(draft=draft, **KNOBS)
    cache.prepare_prefill(target, ids, {"attention_mask": mask}, expand_size=2)
    actual = target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **kwargs)
    assert torch.equal(actual, expected)


def test_continuation_of_a_prefilled_cache_is_kept_on_a_bound_model(models):
    target, draft = models
    ids, mask = random_batch(1, 30, [0], seed=6)
    cache = hs.SpecKVCache(draft=draft, **KNOBS)
    cache.prepare_prefill(target, ids, {"attention_mask": mask})
    counter = CallCounter(draft)
    try:
        out = run(target, cache, ids, mask)
    finally:
        counter.handle.remove()
    assert counter.calls == 0  # generate continued the filled cache: the draft did not run again
    assert_matches_oracle(target, cache, ids, mask, out)


def test_reset_forgets_the_prompt_and_fixed_lookahead_belongs_to_one_prompt(models):
    target, draft = models
    ids, mask = random_batch(1, 30, [0], seed=7)
    lookahead = torch.tensor([[5, 6, 7, 8]])
    cache = hs.SpecKVCache(lookahead_ids=lookahead, **{k: v for k, v in KNOBS.items() if k != "lookahead_tokens"})
    first = run(target, cache, ids, mask)
    assert torch.equal(cache.lookahead_ids, lookahead)
    cache.reset()
    assert cache.lookahead_ids is None and cache.get_seq_length() == 0 and cache.consumed_ids.numel() == 0
    again = run(target, cache, ids, mask)  # the same prompt: its lookahead still applies
    assert_same(again, first)
    other, other_mask = random_batch(1, 32, [0], seed=8)
    cache.reset()
    with pytest.raises(ValueError, match="fixed `lookahead_ids`"):
        run(target, cache, other, other_mask)
    with pytest.raises(ValueError, match="fixed `lookahead_ids`"):  # and without reset()
        run(target, cache, other, other_mask)
    # With a draft, another prompt is previewed by the draft, exactly as a fresh cache would.
    with_draft = hs.SpecKVCache(draft=draft, lookahead_ids=lookahead, **KNOBS)
    run(target, with_draft, ids, mask)
    assert_same(run(target, with_draft, other, other_mask), run(target, hs.SpecKVCache(draft=draft, **KNOBS), other,
                                                                 other_mask))


def test_deepcopy_shares_the_draft_and_copies_the_tensors(models):
    target, draft = models
    ids, mask = random_batch(1, 30, [0], seed=9)
    cache = hs.SpecKVCache(draft=draft, **KNOBS)
    cache.prepare_prefill(target, ids, {"attention_mask": mask})
    copied = copy.deepcopy(cache)
    assert copied.draft is draft
    assert copied.layers[0].keys is not cache.layers[0].keys
    assert torch.equal(copied.layers[0].keys, cache.layers[0].keys)
    assert_same(run(target, copied, ids, mask), run(target, cache, ids, mask))


def test_an_edited_config_is_validated_at_use_before_any_work(models):
    target, draft = models
    cache = hs.SpecKVCache(draft=draft, **KNOBS)
    cache.config.max_capacity_prompt = 3  # below the window of 3: invalid
    counter = CallCounter(draft)
    ids, mask = random_batch(1, 30, [0], seed=10)
    try:
        with pytest.raises(ValueError, match="max_capacity_prompt"):
            run(target, cache, ids, mask)
    finally:
        counter.handle.remove()
    assert counter.calls == 0


@pytest.mark.parametrize("setting", [dict(use_cache=False), dict(prefill_chunk_size=8),
                                     dict(generation_config=GenerationConfig(prefill_chunk_size=8, max_new_tokens=3,
                                                                             pad_token_id=0))])
def test_unservable_generation_settings_are_refused_before_any_work(models, setting):
    target, draft = models
    ids, mask = random_batch(1, 30, [0], seed=11)
    cache = hs.SpecKVCache(draft=draft, **KNOBS)
    draft_calls, target_calls = CallCounter(draft), CallCounter(target)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    if "generation_config" in setting:
        kwargs = {}
    try:
        with pytest.raises(ValueError, match="use_cache|prefill_chunk_size"):
            target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **setting, **kwargs)
    finally:
        draft_calls.handle.remove()
        target_calls.handle.remove()
    assert draft_calls.calls == 0 and target_calls.calls == 0


@pytest.mark.parametrize("flag", ["output_attentions", "output_hidden_states"])
def test_prompt_attentions_and_hidden_states_are_refused(models, flag):
    target, draft = models
    ids, mask = random_batch(1, 30, [0], seed=12)
    counter = CallCounter(draft)
    try:
        with pytest.raises(ValueError, match=flag):
            target.generate(input_ids=ids, attention_mask=mask, past_key_values=hs.SpecKVCache(draft=draft, **KNOBS),
                            max_new_tokens=2, return_dict_in_generate=True, pad_token_id=0, **{flag: True})
    finally:
        counter.handle.remove()
    assert counter.calls == 0


def test_all_padding_rows_and_empty_prompts_are_refused(models):
    target, draft = models
    ids, mask = random_batch(2, 30, [0, 0], seed=13)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"Rows \[1\] of the batch are all padding"):
        run(target, hs.SpecKVCache(draft=draft, **KNOBS), ids, mask)
    cache = hs.SpecKVCache(draft=draft, **KNOBS)
    with pytest.raises(ValueError, match="non-empty"):
        cache.prepare_prefill(target, ids[:, :0], {"attention_mask": mask[:, :0]})


def test_concurrent_generate_calls_on_one_bound_model_overlap_and_are_exact(models):
    """Separate caches on several threads: no shared switch (the scoring wrapper is installed for the bound life),
    and the calls really overlap (a barrier inside the draft would time out if they were serialised)."""
    target, _ = models
    draft = tiny_model("llama", seed=23, num_layers=1)
    threads_count = 3
    barrier = threading.Barrier(threads_count, timeout=60)
    arrived = set()

    def wait_for_everyone(module, args, kwargs):
        thread = threading.get_ident()
        if thread not in arrived:  # the first draft forward of each call waits for the other calls to start
            arrived.add(thread)
            barrier.wait()

    handle = draft.register_forward_pre_hook(wait_for_everyone, with_kwargs=True)
    prompts = [random_batch(1, 28 + 4 * i, [0], seed=30 + i) for i in range(threads_count)]
    results, errors = {}, []

    def work(index):
        try:
            ids, mask = prompts[index]
            results[index] = run(target, hs.SpecKVCache(draft=draft, **KNOBS), ids, mask)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    try:
        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads_count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
    finally:
        handle.remove()
    assert not errors, errors
    for index, (ids, mask) in enumerate(prompts):
        assert_same(results[index], run(target, hs.SpecKVCache(draft=draft, **KNOBS), ids, mask))


def test_unbind_restores_the_model_exactly():
    target = tiny_model("llama", seed=24)
    before = target.config._attn_implementation
    hs.bind(target)
    # Where transformers calls `Cache.prepare_prefill` itself, bind wraps no `generate` (only the scoring attention).
    assert hs.is_bound(target) and ("generate" in vars(target)) is not hs.compat.has_native_prepare_prefill()
    assert target.config._attn_implementation != before  # the scoring wrapper, for the bound life
    hs.unbind(target)
    assert not hs.is_bound(target) and "generate" not in vars(target)
    assert target.config._attn_implementation == before
    assert not target._forward_pre_hooks


# ------------------------------------------------------------------------------------------------------------------
# Property: sequences of prompts on one cache (architectures x padding x budgets x batch x reuse). The default run is
# small; HF_SPECAPPROX_THOROUGH=1 (the `thorough` tox env) runs 500 examples and checks how many compressed.
# ------------------------------------------------------------------------------------------------------------------
THOROUGH = os.environ.get("HF_SPECAPPROX_THOROUGH") == "1"
EXAMPLES = 500 if THOROUGH else 12
COUNTS = {"examples": 0, "calls": 0, "compressed": 0, "continuations": 0}

prompt_strategy = st.tuples(st.integers(1, 3), st.integers(14, 40), st.lists(st.integers(0, 10), min_size=3,
                                                                              max_size=3))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    family=st.sampled_from(FAMILIES),
    attn=st.sampled_from(["sdpa", "eager"]),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2]),
    budget=st.integers(5, 20),
    window=st.integers(1, 4),
    method=st.sampled_from(["speckv", "snapkv"]),
    prompts=st.lists(prompt_strategy, min_size=2, max_size=3),
    continue_last=st.booleans(),
)
def test_reuse_sequences_equal_fresh_caches_and_the_oracle(family, attn, kv_heads, group, budget, window, method,
                                                           prompts, continue_last):
    target = hs.bind(tiny_model(family, seed=3, num_layers=2, num_kv_heads=kv_heads, num_heads=kv_heads * group,
                                attn_implementation=attn))
    draft = tiny_model("llama", seed=4, num_layers=1)
    window = min(window, budget - 1)

    def fresh():
        if method == "speckv":
            return hs.SpecKVCache(draft=draft, max_capacity_prompt=budget, window_size=window, lookahead_tokens=3)
        return hs.SnapKVCache(max_capacity_prompt=budget, window_size=window)

    COUNTS["examples"] += 1
    cache = fresh()
    out = None
    for index, (batch, length, paddings) in enumerate(prompts):
        ids, mask = random_batch(batch, length, [0] + [min(p, length - 2) for p in paddings[1:batch]], seed=index)
        out = run(target, cache, ids, mask, new_tokens=2)
        assert_same(out, run(target, fresh(), ids, mask, new_tokens=2))
        COUNTS["calls"] += 1
        if cache.is_compressed:
            COUNTS["compressed"] += 1
            assert_matches_oracle(target, cache, ids, mask, out)
    if continue_last and cache.is_compressed:
        prompt_length = ids.shape[1]
        sequences = torch.cat([out.sequences, torch.full((out.sequences.shape[0], 2), 9)], dim=1)
        longer_mask = torch.cat([mask, torch.ones(mask.shape[0], sequences.shape[1] - prompt_length,
                                                  dtype=mask.dtype)], dim=1)
        second = run(target, cache, sequences, longer_mask, new_tokens=2)
        COUNTS["continuations"] += 1
        kept = {i: cache.kept_positions(i) for i in range(len(cache.layers)) if cache.kept_positions(i) is not None}
        valid = torch.cat([mask.bool(), torch.ones(mask.shape[0], second.sequences.shape[1] - prompt_length,
                                                   dtype=torch.bool)], 1)
        oracle_prompt = prompt_length if continuation_keeps_the_cache() else sequences.shape[1]
        expected = oracle_logits(target, second.sequences[:, :-1], valid[:, :-1], oracle_prompt, kept)
        start = sequences.shape[1] - 1
        torch.testing.assert_close(torch.stack(second.logits, 1), expected[:, start:], atol=1e-4, rtol=0)


def test_reuse_property_compressed_often_enough():
    """The property above must mostly exercise compression (not prompts that fit the budget)."""
    if COUNTS["examples"] == 0:
        pytest.skip("the property test did not run in this session")
    assert COUNTS["compressed"] >= 0.5 * COUNTS["calls"], COUNTS
    if THOROUGH:
        assert COUNTS["examples"] >= 500 and COUNTS["continuations"] >= 50, COUNTS
        print(f"thorough reuse property: {COUNTS}")
