"""DraftAgreementMonitor: exact under assisted decoding, beam search and `num_return_sequences`.

Oracle: the returned sequences compared with the draft tokens by plain Python loops (`hand_count`).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import pipeline

import hf_specapprox as hs
from tiny_models import VOCAB, random_batch, tiny_model, tiny_tokenizer, words

SPECKV = dict(max_capacity_prompt=16, window_size=4, lookahead_tokens=6)


@pytest.fixture(scope="module")
def models():
    target = tiny_model("qwen2", seed=1, num_heads=4, num_kv_heads=2)
    draft = tiny_model("llama", seed=2, num_layers=2)
    assistant = tiny_model("llama", seed=5, num_layers=1)  # unrelated to the draft: its candidates are its own
    return target, draft, assistant


def hand_count(answer: list[int], draft: list[int], valid: list[bool], eos=()) -> tuple[int, int, int]:
    """(matches, compared, matched prefix) of one answer against one row of draft tokens."""
    matches = compared = prefix = 0
    missed = False
    for position, token in enumerate(answer[: len(draft)]):
        if valid[position]:
            compared += 1
            if token == draft[position]:
                matches += 1
                prefix += not missed
            else:
                missed = True
        if token in eos:
            break
    return matches, compared, prefix


def expected_numbers(sequences, prompt_length, draft_rows, valid_rows, eos=()):
    counts = [hand_count(seq[prompt_length:], d, v, eos) for seq, d, v in zip(sequences, draft_rows, valid_rows)]
    agreement = [m / c if c else float("nan") for m, c, _ in counts]
    return torch.tensor(agreement), [p for _, _, p in counts]


def generate(target, ids, mask, **kwargs):
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, **kwargs}
    return target.generate(input_ids=ids, attention_mask=mask, **kwargs)


@contextlib.contextmanager
def no_eos(*models):
    """Answers of exactly `max_new_tokens` under assisted decoding, where transformers 4.57 refuses `min_new_tokens`."""
    saved = [model.generation_config.eos_token_id for model in models]
    try:
        for model in models:
            model.generation_config.eos_token_id = None
        yield
    finally:
        for model, eos in zip(models, saved):
            model.generation_config.eos_token_id = eos


def test_assisted_decoding_with_a_cache_counts_the_targets_answer_only(models):
    """Before: the assistant's first call came before the target's prefill, so `agreement` raised "not compressed"
    (and with a tensor source the assistant's candidate tokens were counted)."""
    target, draft, assistant = models
    ids, mask = random_batch(1, 40, [0], seed=3)
    plain_cache = hs.SpecKVCache(draft=draft, model=target, **SPECKV)
    plain = generate(target, ids, mask, past_key_values=plain_cache)
    cache = hs.SpecKVCache(draft=draft, model=target, **SPECKV)
    monitor = hs.DraftAgreementMonitor(cache)
    out = generate(target, ids, mask, past_key_values=cache, assistant_model=assistant, logits_processor=[monitor])
    assert torch.equal(out, plain)  # greedy assisted decoding = greedy
    assert torch.equal(cache.lookahead_ids, plain_cache.lookahead_ids)
    agreement, prefix = expected_numbers(out.tolist(), 40, cache.lookahead_ids.tolist(),
                                         cache.lookahead_valid.tolist())
    torch.testing.assert_close(monitor.agreement(out), agreement, equal_nan=True)
    assert monitor.matched_prefix(out).tolist() == prefix


def test_assisted_decoding_with_the_answer_as_draft_tokens_agrees_fully(models):
    """Draft tokens equal to the target's greedy answer: agreement 1.0 and the whole answer matched, whatever the
    assistant proposed (before: the assistant's rejected candidates were compared)."""
    target, _, assistant = models
    for seed in (5, 6):
        ids, _ = random_batch(1, 20, [0], seed=seed)
        with no_eos(target, assistant):
            answer = generate(target, ids, None)[:, 20:]
            monitor = hs.DraftAgreementMonitor(answer.clone())
            out = generate(target, ids, None, assistant_model=assistant, logits_processor=[monitor])
        assert torch.equal(out[:, 20:], answer)
        assert monitor.agreement(out).tolist() == [1.0]
        assert monitor.matched_prefix(out).tolist() == [8]


def test_assisted_decoding_with_chosen_draft_tokens(models):
    """Fixed `lookahead_ids` chosen here; the counts are made by hand from the returned sequence."""
    target, _, assistant = models
    ids, mask = random_batch(1, 40, [0], seed=6)
    chosen = torch.tensor([[5, 17, 17, 40, 2, 9]])
    chosen_valid = torch.tensor([[True, True, True, True, True, False]])
    cache = hs.SpecKVCache(model=target, lookahead_ids=chosen, lookahead_valid=chosen_valid, **SPECKV)
    monitor = hs.DraftAgreementMonitor(cache)
    with no_eos(target, assistant):
        out = generate(target, ids, mask, past_key_values=cache, assistant_model=assistant, logits_processor=[monitor])
    agreement, prefix = expected_numbers(out.tolist(), 40, chosen.tolist(), chosen_valid.tolist())
    torch.testing.assert_close(monitor.agreement(out), agreement, equal_nan=True)
    assert monitor.matched_prefix(out).tolist() == prefix
    # The same answer with one draft token made equal to the answer's: exactly one more match.
    answer = out[0, 40:].tolist()
    patched = chosen.clone()
    position = next(i for i in range(5) if answer[i] != chosen[0, i])
    patched[0, position] = answer[position]
    monitor = hs.DraftAgreementMonitor(patched, chosen_valid)
    monitor(out[:, :40], torch.zeros(1, VOCAB))  # the prompt length, as generate's first call would record it
    assert monitor.agreement(out).item() == pytest.approx(agreement.item() + 1 / 5)


@pytest.mark.parametrize("num_beams, num_return_sequences, eos", [(3, 2, None), (3, 2, 2), (2, 2, 2), (4, 1, None)])
def test_beam_search_with_several_returned_sequences(models, num_beams, num_return_sequences, eos):
    """Before: the counts were kept per running beam (reordered every step) and `agreement(sequences)` raised a
    shape error when `num_return_sequences` differed from `num_beams`. The target is its own draft here, so the
    answers agree with the preview in part (a non-trivial count)."""
    target, _, _ = models
    ids, mask = random_batch(2, 40, [0, 6], seed=7)
    cache = hs.SpecKVCache(draft=target, model=target, **SPECKV)
    monitor = hs.DraftAgreementMonitor(cache, eos_token_id=eos)
    out = generate(target, ids, mask, past_key_values=cache, num_beams=num_beams, max_new_tokens=6,
                   num_return_sequences=num_return_sequences, logits_processor=[monitor])
    assert out.shape[0] == 2 * num_return_sequences
    assert cache.lookahead_ids.shape[0] == 2 * num_beams
    per_prompt = cache.lookahead_ids[::num_beams].tolist(), cache.lookahead_valid[::num_beams].tolist()
    for prompt in range(2):  # every beam of a prompt carries that prompt's draft tokens
        beams = cache.lookahead_ids[prompt * num_beams : (prompt + 1) * num_beams]
        assert (beams == beams[0]).all()
    drafts = [per_prompt[0][s // num_return_sequences] for s in range(out.shape[0])]
    valids = [per_prompt[1][s // num_return_sequences] for s in range(out.shape[0])]
    agreement, prefix = expected_numbers(out.tolist(), 40, drafts, valids, eos=() if eos is None else (eos,))
    assert agreement.nan_to_num().sum() > 0
    torch.testing.assert_close(monitor.agreement(out), agreement, equal_nan=True)
    assert monitor.matched_prefix(out).tolist() == prefix


def test_sampling_with_num_return_sequences_and_per_prompt_draft_tokens(models):
    target, _, _ = models
    ids, mask = random_batch(2, 20, [0, 2], seed=8)
    draft_tokens = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
    monitor = hs.DraftAgreementMonitor(draft_tokens)
    torch.manual_seed(0)
    out = generate(target, ids, mask, do_sample=True, num_return_sequences=3, logits_processor=[monitor])
    rows = [draft_tokens[s // 3].tolist() for s in range(6)]
    agreement, prefix = expected_numbers(out.tolist(), 20, rows, [[True] * 6] * 6)
    torch.testing.assert_close(monitor.agreement(out), agreement, equal_nan=True)
    assert monitor.matched_prefix(out).tolist() == prefix


def test_pipeline_with_beams_and_several_returned_sequences(models):
    """Issue 11 item 7: the result was lost to a RuntimeError in the monitor after generation."""
    target, _, _ = models
    tokenizer = tiny_tokenizer()
    config = hs.SpecKVConfig(**SPECKV)
    pipe = pipeline("speckv-text-generation", model=target, tokenizer=tokenizer, draft_model=target,
                    speckv_config=config)
    prompt = words(40, 2)
    records = pipe(prompt, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    assert len(records) == 2
    inputs = tokenizer(prompt, return_tensors="pt")
    cache = hs.SpecKVCache(draft=target, model=target, config=config)
    out = target.generate(**inputs, past_key_values=cache, max_new_tokens=6, num_beams=3, num_return_sequences=2,
                          do_sample=False)
    drafts = [cache.lookahead_ids[0].tolist()] * 2
    valids = [cache.lookahead_valid[0].tolist()] * 2
    agreement, _ = expected_numbers(out.tolist(), inputs["input_ids"].shape[1], drafts, valids)
    assert agreement.sum() > 0
    assert [r["hf_specapprox"]["draft_agreement"] for r in records] == pytest.approx(agreement.tolist(), nan_ok=True)


def test_the_monitor_reads_nothing_during_generation():
    """Pass-through without touching tensor data: it runs on meta tensors (any read would raise) and returns the
    very scores it was given."""
    monitor = hs.DraftAgreementMonitor(torch.zeros(2, 3, dtype=torch.long))
    scores = torch.empty(2, VOCAB, device="meta")
    assert monitor(torch.empty(2, 7, dtype=torch.long, device="meta"), scores) is scores
    assert monitor(torch.empty(2, 9, dtype=torch.long, device="meta"), scores) is scores
    assert monitor.prompt_length == 7


def test_an_uncompressed_prompt_and_misuse_are_reported(models):
    target, draft, _ = models
    ids, mask = random_batch(1, 8, [0], seed=9)
    cache = hs.SpecKVCache(draft=draft, model=target, **SPECKV)
    monitor = hs.DraftAgreementMonitor(cache)
    out = generate(target, ids, mask, past_key_values=cache, logits_processor=[monitor])
    with pytest.raises(ValueError, match="not compressed"):
        monitor.agreement(out)
    with pytest.raises(ValueError, match="Nothing was recorded"):
        hs.DraftAgreementMonitor(cache).agreement(out)
    with pytest.raises(ValueError, match="what `generate` returned"):
        monitor.agreement()
    tokens = hs.DraftAgreementMonitor(torch.tensor([[1, 2], [3, 4], [5, 6]]))
    tokens(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, VOCAB))
    with pytest.raises(ValueError, match="3 rows of draft tokens cannot serve 2 sequences"):
        tokens.agreement(torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(TypeError, match="SpecKVCache"):
        hs.DraftAgreementMonitor([1, 2, 3])


def test_reset_and_reuse(models):
    target, _, _ = models
    ids, mask = random_batch(1, 12, [0], seed=10)
    monitor = hs.DraftAgreementMonitor(torch.tensor([[7, 8, 9]]))
    long_out = generate(target, ids, mask, logits_processor=[monitor])
    monitor.reset()
    short_out = generate(target, ids[:, 4:], mask[:, 4:], logits_processor=[monitor])
    assert monitor.prompt_length == 8
    agreement, _ = expected_numbers(short_out.tolist(), 8, [[7, 8, 9]], [[True] * 3])
    torch.testing.assert_close(monitor.agreement(short_out), agreement, equal_nan=True)
    assert long_out.shape[1] > 12


@settings(max_examples=150, deadline=None)
@given(data=st.data(), prompts=st.integers(1, 3), num_beams=st.integers(1, 4), returned=st.integers(1, 4),
       prompt_length=st.integers(0, 5), answer_length=st.integers(0, 8), draft_length=st.integers(0, 8),
       use_eos=st.booleans(), expanded=st.booleans())
def test_comparison_equals_hand_count(data, prompts, num_beams, returned, prompt_length, answer_length, draft_length,
                                      use_eos, expanded):
    """Any expansion (`returned` sequences per prompt; draft rows per prompt, or per beam as a cache holds them),
    EOS inside the answers, draft EOS (valid masks that end early): the monitor equals the hand count."""
    returned = min(returned, num_beams) if expanded else returned
    tokens_per_prompt = [data.draw(st.lists(st.integers(0, 5), min_size=draft_length, max_size=draft_length))
                         for _ in range(prompts)]
    valid_per_prompt = []
    for _ in range(prompts):
        cut = data.draw(st.integers(0, draft_length))
        valid_per_prompt.append([i < cut for i in range(draft_length)])
    sequences = [data.draw(st.lists(st.integers(0, 5), min_size=prompt_length + answer_length,
                                    max_size=prompt_length + answer_length)) for _ in range(prompts * returned)]
    per_row = num_beams if expanded else 1
    tokens = torch.tensor([row for row in tokens_per_prompt for _ in range(per_row)], dtype=torch.long)
    valid = torch.tensor([row for row in valid_per_prompt for _ in range(per_row)], dtype=torch.bool)
    tokens, valid = tokens.reshape(prompts * per_row, draft_length), valid.reshape(prompts * per_row, draft_length)
    eos = (2,) if use_eos else ()
    monitor = hs.DraftAgreementMonitor(tokens, valid, eos_token_id=list(eos) or None)
    monitor(torch.zeros(prompts * per_row, prompt_length + 1, dtype=torch.long), torch.zeros(1, 6))
    monitor(torch.zeros(prompts * per_row, prompt_length, dtype=torch.long), torch.zeros(1, 6))
    out = torch.tensor(sequences, dtype=torch.long).reshape(prompts * returned, prompt_length + answer_length)
    rows = [s // returned for s in range(prompts * returned)]
    agreement, prefix = expected_numbers(sequences, prompt_length, [tokens_per_prompt[r] for r in rows],
                                         [valid_per_prompt[r] for r in rows], eos)
    torch.testing.assert_close(monitor.agreement(out), agreement, equal_nan=True)
    assert monitor.matched_prefix(out).tolist() == prefix


def test_generate_dicts_and_an_explicit_prompt_length(models):
    target, _, _ = models
    ids, mask = random_batch(1, 12, [0], seed=11)
    monitor = hs.DraftAgreementMonitor(torch.tensor([[7, 8, 9, 10]]))
    out = generate(target, ids, mask, logits_processor=[monitor], return_dict_in_generate=True)
    expected, prefix = expected_numbers(out.sequences.tolist(), 12, [[7, 8, 9, 10]], [[True] * 4])
    torch.testing.assert_close(monitor.agreement(out), expected, equal_nan=True)
    assert monitor.matched_prefix(out).tolist() == prefix
    shifted, _ = expected_numbers(out.sequences.tolist(), 10, [[7, 8, 9, 10]], [[True] * 4])
    torch.testing.assert_close(monitor.agreement(out.sequences, prompt_length=10), shifted, equal_nan=True)
    with pytest.raises(ValueError, match="fewer than the prompt's"):
        monitor.agreement(out.sequences[:, :5])
