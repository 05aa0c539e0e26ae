"""Many questions over one long context: a retained context answers every call exactly as a fresh cache over the
call's whole ids does (dense prefill), and the context is never prefilled again.

Oracles: a fresh cache of the same method over the same ids (tokens equal, logits within 1e-4), and the masked-attention
oracle (`tests/oracle.py`) for the kept positions. Work saved is counted on the models' forwards.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import hf_specapprox as hs
from test_oracle import assert_matches_oracle
from tiny_models import FAMILIES, PAD_ID, random_batch, tiny_model

KNOBS = dict(max_capacity_prompt=12, window_size=3, lookahead_tokens=4)
GEN = dict(pad_token_id=PAD_ID, do_sample=False, return_dict_in_generate=True, output_logits=True)


class TokenCounter:
    """Counts the tokens the forwards of a module process (a forward pre-hook)."""

    def __init__(self, module):
        self.tokens = 0
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.tokens += ids.shape[-1]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def models():
    target = tiny_model("qwen2", seed=31, num_heads=4, num_kv_heads=2)
    draft = tiny_model("llama", seed=32, num_layers=1)
    return hs.bind(target), draft


def run(target, cache, ids, mask=None, new_tokens=3, **kwargs):
    mask = torch.ones_like(ids) if mask is None else mask
    return target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, **{**GEN, **kwargs})


def assert_same(actual, expected):
    assert torch.equal(actual.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(actual.logits), torch.stack(expected.logits), atol=1e-4, rtol=0)


def context_and_questions(length=40, questions=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    context = torch.randint(3, 90, (1, length), generator=generator)
    asked = [torch.randint(3, 90, (1, 3 + 2 * index), generator=generator) for index in range(questions)]
    return context, asked


@pytest.mark.parametrize("family", FAMILIES)
def test_each_question_equals_a_fresh_cache_over_its_ids(family):
    target = hs.bind(tiny_model(family, seed=33, num_heads=4, num_kv_heads=2, num_layers=2))
    draft = tiny_model("llama", seed=34, num_layers=1)
    context, questions = context_and_questions(seed=1)
    cache = hs.SpecKVCache(draft=draft, **KNOBS).retain_context(target, context)
    for question in questions:
        ids = torch.cat([context, question], dim=1)
        retained = run(target, copy.deepcopy(cache), ids)
        fresh = run(target, hs.SpecKVCache(draft=draft, **KNOBS), ids)
        assert_same(retained, fresh)
    used = copy.deepcopy(cache)
    out = run(target, used, torch.cat([context, questions[0]], dim=1))
    assert_matches_oracle(target, used, torch.cat([context, questions[0]], dim=1), torch.ones(1, 43, dtype=torch.long),
                          out)


def test_the_context_is_prefilled_once(models):
    target, draft = models
    context, questions = context_and_questions(length=60, seed=2)
    cache = hs.SpecKVCache(draft=draft, **KNOBS).retain_context(target, context)
    assert cache.context.length == 60 and cache.context.has_draft
    ids = torch.cat([context, questions[2]], dim=1)  # 60 + 7 tokens
    with TokenCounter(target.base_model) as on_target, TokenCounter(draft) as on_draft:
        run(target, copy.deepcopy(cache), ids, new_tokens=2)
    # The target's scoring forward runs over the question and the preview (then 2 decoding steps), never over the
    # context; the draft reads only the question, then previews.
    assert on_target.tokens <= questions[2].shape[1] + KNOBS["lookahead_tokens"] + 2
    assert on_draft.tokens <= questions[2].shape[1] + KNOBS["lookahead_tokens"]
    # A fresh cache reads the whole prompt with both models.
    with TokenCounter(target.base_model) as fresh_target:
        run(target, hs.SpecKVCache(draft=draft, **KNOBS), ids, new_tokens=2)
    assert fresh_target.tokens >= ids.shape[1]


def test_a_conversation_on_one_cache_equals_fresh_caches_and_grows_the_context(models):
    target, draft = models
    context, questions = context_and_questions(seed=3)
    cache = hs.SpecKVCache(draft=draft, **KNOBS).retain_context(target, context)
    conversation = context
    for turn, question in enumerate(questions):
        conversation = torch.cat([conversation, question], dim=1)
        answer = run(target, cache, conversation, new_tokens=3)
        expected = run(target, hs.SpecKVCache(draft=draft, **KNOBS), conversation, new_tokens=3)
        assert_same(answer, expected)
        assert_matches_oracle(target, cache, conversation, torch.ones_like(conversation), answer)
        # the context now holds the conversation up to this turn's last prompt token, computed with full attention
        assert cache.context.length == conversation.shape[1] - 1
        conversation = answer.sequences


def test_copies_share_the_context_and_never_see_each_others_questions(models):
    target, draft = models
    context, questions = context_and_questions(seed=4)
    cache = hs.SpecKVCache(draft=draft, **KNOBS).retain_context(target, context)
    shared = cache.context
    copies = [copy.deepcopy(cache) for _ in questions]
    assert all(each.context is shared for each in copies)
    for each, question in zip(copies, questions):
        ids = torch.cat([context, question], dim=1)
        assert_same(run(target, each, ids), run(target, hs.SpecKVCache(draft=draft, **KNOBS), ids))
    assert cache.context is shared and shared.length == context.shape[1]  # the original is untouched
    # one cache asked a second, unrelated question over the same context starts from the context, not the first
    single = copy.deepcopy(cache)
    for question in questions:
        ids = torch.cat([context, question], dim=1)
        assert_same(run(target, single, ids), run(target, hs.SpecKVCache(draft=draft, **KNOBS), ids))


def test_a_left_padded_batch_of_questions_over_one_context(models):
    target, draft = models
    context, questions = context_and_questions(seed=5)
    rows = [torch.cat([context, question], dim=1)[0] for question in questions]
    width = max(row.shape[0] for row in rows)
    ids = torch.full((len(rows), width), PAD_ID)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, width - row.shape[0]:] = row
        mask[index, width - row.shape[0]:] = 1
    cache = hs.SpecKVCache(draft=draft, **KNOBS).retain_context(target, context)
    batched = run(target, cache, ids, mask)
    assert_same(batched, run(target, hs.SpecKVCache(draft=draft, **KNOBS), ids, mask))
    assert_matches_oracle(target, cache, ids, mask, batched)
    assert cache.context.length == context.shape[1]  # a batch never grows the context


@pytest.mark.parametrize("setting", [dict(num_beams=2), dict(num_beams=2, num_return_sequences=2),
                                     dict(do_sample=True, num_return_sequences=2)])
def test_beams_and_sampling(models, setting):
    target, draft = models
    context, questions = context_and_questions(seed=6)
    ids = torch.cat([context, questions[1]], dim=1)
    cache = hs.SpecKVCache(draft=draft, **KNOBS).retain_context(target, context)
    kwargs = dict(max_new_tokens=3, pad_token_id=PAD_ID, **setting)
    torch.manual_seed(0)
    retained = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, **kwargs)
    torch.manual_seed(0)
    fresh = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                            past_key_values=hs.SpecKVCache(draft=draft, **KNOBS), **kwargs)
    assert torch.equal(retained, fresh)


def test_reset_keeps_the_context_and_static_decoding_and_snapkv(models):
    target, draft = models
    context, questions = context_and_questions(seed=7)
    ids = torch.cat([context, questions[0]], dim=1)
    cache = hs.SpecKVCache(draft=draft, **KNOBS).retain_context(target, context)
    first = run(target, cache, ids)
    cache.reset()
    assert cache.context is not None and cache.get_seq_length() == 0
    assert_same(run(target, cache, ids), first)
    static = hs.SpecKVCache(draft=draft, **KNOBS).use_static_decode(3).retain_context(target, context)
    assert torch.equal(run(target, static, ids).sequences, first.sequences) and static.is_static
    snap = hs.SnapKVCache(max_capacity_prompt=12, window_size=3).retain_context(target, context)
    assert not snap.context.has_draft
    assert_same(run(target, snap, ids), run(target, hs.SnapKVCache(max_capacity_prompt=12, window_size=3), ids))


def test_the_explicit_step_on_an_unbound_model_and_an_offloaded_context(models):
    bound, draft = models
    target = copy.deepcopy(bound)
    hs.unbind(target)
    context, questions = context_and_questions(seed=8)
    ids = torch.cat([context, questions[2]], dim=1)
    expected = run(bound, hs.SpecKVCache(draft=draft, **KNOBS), ids)
    for offload in (False, True):
        cache = hs.SpecKVCache(draft=draft, **KNOBS).retain_context(target, context, offload=offload)
        assert cache.context.offloaded is offload
        cache.prepare_prefill(target, ids, {"attention_mask": torch.ones_like(ids)})
        assert_same(run(target, cache, ids), expected)


def test_copies_on_threads_share_one_context(models):
    target, draft = models
    context, questions = context_and_questions(seed=9)
    cache = hs.SpecKVCache(draft=draft, **KNOBS).retain_context(target, context)
    expected = [run(target, hs.SpecKVCache(draft=draft, **KNOBS), torch.cat([context, q], dim=1)).sequences
                for q in questions]
    results, errors = {}, []

    def ask(index):
        try:
            for _ in range(3):
                ids = torch.cat([context, questions[index]], dim=1)
                results.setdefault(index, []).append(run(target, copy.deepcopy(cache), ids).sequences)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for index, outputs in results.items():
        assert all(torch.equal(output, expected[index]) for output in outputs)


def test_ids_that_do_not_start_with_the_context_are_a_fresh_prompt(models):
    target, draft = models
    context, questions = context_and_questions(seed=10)
    other, _ = random_batch(1, 45, [0], seed=11)
    cache = hs.SpecKVCache(draft=draft, **KNOBS).retain_context(target, context)
    with TokenCounter(target.base_model) as counter:
        out = run(target, cache, other)
    assert counter.tokens >= other.shape[1]  # prefilled whole
    assert_same(out, run(target, hs.SpecKVCache(draft=draft, **KNOBS), other))
    assert cache.context.length == context.shape[1]


def test_a_context_of_another_model_or_draft_or_edited_is_refused_before_any_work(models):
    target, draft = models
    context, questions = context_and_questions(seed=12)
    ids = torch.cat([context, questions[0]], dim=1)
    other_target = hs.bind(tiny_model("qwen2", seed=31, num_heads=4, num_kv_heads=2))
    cache = hs.SpecKVCache(draft=draft, **KNOBS).retain_context(other_target, context)
    with TokenCounter(target.base_model) as counter, pytest.raises(ValueError, match="another target model"):
        run(target, cache, ids)
    assert counter.tokens == 0
    other_draft = tiny_model("llama", seed=35, num_layers=1)
    cache = hs.SpecKVCache(draft=other_draft, **KNOBS)
    cache.context = hs.SpecKVCache(draft=draft, **KNOBS).retain_context(target, context).context
    with pytest.raises(ValueError, match="another draft"):
        run(target, cache, ids)
    cache = hs.SpecKVCache(draft=draft, **KNOBS).retain_context(target, context)
    keys, _ = cache.context._segments[0].target[0]
    keys.mul_(2)  # edited in place after the prefill
    with TokenCounter(target.base_model) as counter, pytest.raises(ValueError, match="modified in place"):
        run(target, cache, ids)
    assert counter.tokens == 0
    with pytest.raises(ValueError, match="one row"):
        hs.SpecKVCache(draft=draft, **KNOBS).retain_context(target, torch.cat([context, context]))


def test_a_cache_used_by_a_second_concurrent_call_says_so(models):
    """Before: two threads on one cache got wrong tokens silently, or a false `UnboundCacheError`."""
    target, draft = models
    ids, mask = random_batch(1, 40, [0], seed=13)
    expected = run(target, hs.SpecKVCache(draft=draft, **KNOBS), ids, mask, new_tokens=6).sequences
    cache = hs.SpecKVCache(draft=draft, **KNOBS)
    outcomes, lock = [], threading.Lock()

    def call():
        for _ in range(5):
            try:
                out = run(target, cache, ids, mask, new_tokens=6).sequences
                with lock:
                    outcomes.append(("ok", torch.equal(out, expected)))
            except hs.CacheInUseError:
                with lock:
                    outcomes.append(("in use", True))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 10 and all(correct for _, correct in outcomes)
