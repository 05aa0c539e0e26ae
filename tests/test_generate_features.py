"""Stock `generate` features with a compressing cache, each checked against the masked-attention oracle."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

import hf_specapprox as hs
from oracle import continuation_keeps_the_cache, oracle_logits
from test_oracle import assert_matches_oracle
from tiny_models import random_batch, tiny_model

GEN = dict(pad_token_id=0, return_dict_in_generate=True, output_logits=True)


@pytest.fixture(scope="module")
def models():
    target = tiny_model("qwen2", seed=11, num_heads=4, num_kv_heads=2)
    draft = tiny_model("llama", seed=12, num_layers=1)
    return hs.bind(target), draft


def make_cache(draft, **overrides):
    knobs = dict(max_capacity_prompt=12, window_size=3, lookahead_tokens=4)
    knobs.update(overrides)
    return hs.SpecKVCache(draft=draft, **knobs)


def sequence_logprob(target, cache, ids, mask, sequences, rows):
    """Sum of oracle log-probs of the generated tokens of `sequences` (one per prompt row in `rows`)."""
    prompt_length = ids.shape[1]
    total = []
    for seq_index, prompt_row in enumerate(rows):
        seq = sequences[seq_index : seq_index + 1]
        valid = torch.cat([mask[prompt_row : prompt_row + 1].bool(), torch.ones(1, seq.shape[1] - prompt_length, dtype=torch.bool)], 1)
        kept = {
            i: cache.kept_positions(i)[seq_index : seq_index + 1]
            for i in range(len(cache.layers))
            if cache.kept_positions(i) is not None
        }
        logits = oracle_logits(target, seq[:, :-1], valid[:, :-1], prompt_length, kept)[:, prompt_length - 1 :]
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, seq[:, prompt_length:, None])[..., 0]
        total.append(logprobs.sum())
    return torch.stack(total)


def test_sampling_with_seed_matches_oracle_and_is_reproducible(models):
    target, draft = models
    ids, mask = random_batch(2, 30, [0, 5], seed=1)
    outs = []
    for _ in range(2):
        cache = make_cache(draft)
        torch.manual_seed(123)
        out = target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, do_sample=True,
                              top_k=0, max_new_tokens=5, min_new_tokens=5, **GEN)
        assert_matches_oracle(target, cache, ids, mask, out)
        outs.append(out.sequences)
    assert torch.equal(outs[0], outs[1])


def test_num_return_sequences_rows_match_oracle(models):
    target, draft = models
    ids, mask = random_batch(2, 30, [0, 4], seed=2)
    cache = make_cache(draft)
    torch.manual_seed(0)
    out = target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, do_sample=True,
                          num_return_sequences=3, max_new_tokens=4, min_new_tokens=4, **GEN)
    assert out.sequences.shape[0] == 6
    expanded_ids, expanded_mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    # Identical rows must get identical selections (the draft runs once per distinct prompt).
    for layer in range(len(cache.layers)):
        kept = cache.kept_positions(layer)
        if kept is not None:
            assert torch.equal(kept[0], kept[1]) and torch.equal(kept[3], kept[5])
    assert_matches_oracle(target, cache, expanded_ids, expanded_mask, out)


def test_beam_search_scores_match_oracle(models):
    target, draft = models
    ids, mask = random_batch(2, 30, [0, 6], seed=3)
    cache = make_cache(draft)
    out = target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, num_beams=3,
                          num_return_sequences=2, max_new_tokens=4, min_new_tokens=4, length_penalty=0.0,
                          early_stopping=True, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                          output_scores=True)
    rows = [0, 0, 1, 1]
    # All beams of a prompt share its selection, so the oracle of a returned beam uses that prompt's first row.
    beam_cache_rows = [0, 0, 3, 3]

    class _Rows:
        layers = cache.layers

        def kept_positions(self, i):
            kept = cache.kept_positions(i)
            return None if kept is None else kept[beam_cache_rows]

    expected = sequence_logprob(target, _Rows(), ids, mask, out.sequences, rows)
    torch.testing.assert_close(out.sequences_scores, expected, atol=1e-4, rtol=1e-4)


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_sees_generated_tokens(models):
    target, draft = models
    ids, _ = random_batch(1, 30, [0], seed=4)
    streamer = CollectingStreamer()
    cache = make_cache(draft)
    out = target.generate(input_ids=ids, past_key_values=cache, streamer=streamer, max_new_tokens=5,
                          min_new_tokens=5, do_sample=False, **GEN)
    streamed = torch.cat([chunk.reshape(-1) for chunk in streamer.chunks[1:]])
    assert torch.equal(streamed, out.sequences[0, 30:]) and streamer.ended
    assert torch.equal(streamer.chunks[0].reshape(-1), ids[0])


def test_continuation_reuses_compressed_cache(models):
    target, draft = models
    ids, mask = random_batch(2, 30, [0, 3], seed=5)
    cache = make_cache(draft)
    first = target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3,
                            min_new_tokens=3, do_sample=False, **GEN)
    follow_up = torch.randint(3, 90, (2, 4), generator=torch.Generator().manual_seed(0))
    sequences = torch.cat([first.sequences, follow_up], dim=1)
    mask2 = torch.cat([mask, torch.ones(2, sequences.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    second = target.generate(input_ids=sequences, attention_mask=mask2, past_key_values=cache, max_new_tokens=3,
                             min_new_tokens=3, do_sample=False, **GEN)
    assert cache.get_seq_length() == second.sequences.shape[1] - 1
    kept = {i: cache.kept_positions(i) for i in range(len(cache.layers)) if cache.kept_positions(i) is not None}
    valid = torch.cat([mask.bool(), torch.ones(2, second.sequences.shape[1] - 30, dtype=torch.bool)], 1)
    prompt_length = 30 if continuation_keeps_the_cache() else sequences.shape[1]
    expected = oracle_logits(target, second.sequences[:, :-1], valid[:, :-1], prompt_length, kept)
    actual = torch.stack(second.logits, 1)
    start = sequences.shape[1] - 1
    torch.testing.assert_close(actual, expected[:, start:], atol=1e-4, rtol=0)


def test_new_prompt_on_used_cache_starts_over_or_says_so(models):
    target, draft = models
    ids, mask = random_batch(2, 30, [0, 3], seed=6)
    cache = make_cache(draft)
    target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3, do_sample=False,
                    pad_token_id=0)
    other, other_mask = random_batch(2, 30, [4, 0], seed=7)
    fresh = make_cache(draft)
    expected = target.generate(input_ids=other, attention_mask=other_mask, past_key_values=fresh, max_new_tokens=3,
                               do_sample=False, **GEN)
    try:
        reused = target.generate(input_ids=other, attention_mask=other_mask, past_key_values=cache,
                                 max_new_tokens=3, do_sample=False, **GEN)
    except (ValueError, IndexError) as error:  # 4.x generate may fail on its own before our check runs
        assert isinstance(error, IndexError) or "fresh cache" in str(error)
    else:
        assert torch.equal(reused.sequences, expected.sequences)
        torch.testing.assert_close(torch.stack(reused.logits), torch.stack(expected.logits))


def test_reset_makes_a_used_cache_fresh(models):
    target, draft = models
    ids, mask = random_batch(1, 30, [0], seed=8)
    cache = make_cache(draft)
    target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3, do_sample=False,
                    pad_token_id=0)
    cache.reset()
    other, other_mask = random_batch(1, 34, [0], seed=9)
    reused = target.generate(input_ids=other, attention_mask=other_mask, past_key_values=cache, max_new_tokens=3,
                             do_sample=False, **GEN)
    fresh = target.generate(input_ids=other, attention_mask=other_mask, past_key_values=make_cache(draft),
                            max_new_tokens=3, do_sample=False, **GEN)
    assert torch.equal(reused.sequences, fresh.sequences)


def test_short_prompt_is_an_ordinary_generate_and_skips_the_draft(models):
    target, _ = models

    class ExplodingDraft(torch.nn.Module):
        config = target.config
        generation_config = target.generation_config

        def generate(self, *args, **kwargs):
            raise AssertionError("the draft must not run when the prompt fits the budget")

    ids, mask = random_batch(2, 10, [0, 2], seed=10)
    cache = hs.SpecKVCache(draft=ExplodingDraft(), max_capacity_prompt=12, window_size=3)
    ours = target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4,
                           do_sample=False, **GEN)
    stock = target.generate(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), max_new_tokens=4,
                            do_sample=False, **GEN)
    assert not cache.is_compressed
    assert torch.equal(ours.sequences, stock.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(stock.logits), atol=1e-5, rtol=0)


def test_crop_removes_only_appended_tokens(models):
    target, draft = models
    ids, _ = random_batch(1, 30, [0], seed=11)
    cache = make_cache(draft)
    target.generate(input_ids=ids, past_key_values=cache, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                    pad_token_id=0)
    seen = cache.get_seq_length()
    rows = cache.layers[0].keys.shape[-2]
    cache.crop(-2)
    assert cache.get_seq_length() == seen - 2 and cache.layers[0].keys.shape[-2] == rows - 2
    cache.crop(0) if hs.compat.crop_must_be_negative() else None
    assert cache.get_seq_length() == seen - 2
    with pytest.raises(ValueError, match="cannot be restored"):
        cache.crop(-(seen - 2))


def test_draft_in_another_dtype_gives_the_same_selection(models):
    target, draft = models
    ids, mask = random_batch(2, 30, [0, 2], seed=12)
    reference = make_cache(draft)
    target.generate(input_ids=ids, attention_mask=mask, past_key_values=reference, max_new_tokens=1, pad_token_id=0)
    draft64 = tiny_model("llama", seed=12, num_layers=1).to(torch.float64)
    other = make_cache(draft64)
    target.generate(input_ids=ids, attention_mask=mask, past_key_values=other, max_new_tokens=1, pad_token_id=0)
    assert torch.equal(reference.lookahead_ids, other.lookahead_ids)
    assert torch.equal(reference.kept_positions(0), other.kept_positions(0))


def test_cache_kwarg_name_of_the_running_version_works(models):
    target, draft = models
    ids, _ = random_batch(1, 30, [0], seed=13)
    name = hs.compat.cache_kwarg_name(target)
    cache = make_cache(draft)
    out = target.generate(input_ids=ids, max_new_tokens=2, do_sample=False, **{name: cache}, **GEN)
    assert cache.is_compressed and out.sequences.shape[1] == 32


def test_stopping_criteria_and_logits_processors_see_the_full_sequence(models):
    from transformers import LogitsProcessor, StoppingCriteria

    target, draft = models
    ids, mask = random_batch(2, 30, [0, 3], seed=14)
    lengths = []

    class RecordLengths(LogitsProcessor):
        def __call__(self, input_ids, scores):
            lengths.append(input_ids.shape[1])
            return scores

    class StopAfterThree(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 33, dtype=torch.bool)

    out = target.generate(input_ids=ids, attention_mask=mask, past_key_values=make_cache(draft), max_new_tokens=10,
                          do_sample=False, logits_processor=[RecordLengths()], stopping_criteria=[StopAfterThree()],
                          **GEN)
    assert out.sequences.shape[1] == 33 and lengths == [30, 31, 32]
    assert_matches_oracle(target, out.past_key_values, ids, mask, out)


def test_batch_operations_carry_the_per_row_selection(models):
    target, draft = models
    ids, mask = random_batch(2, 30, [0, 5], seed=15)
    cache = make_cache(draft)
    target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2, do_sample=False,
                    pad_token_id=0)
    layer = cache.layers[0]
    keys, kept, prompt_mask = layer.keys.clone(), layer.kept_positions.clone(), cache.prompt_mask.clone()
    cache.batch_repeat_interleave(2)
    assert torch.equal(layer.keys, keys.repeat_interleave(2, 0))
    assert torch.equal(layer.kept_positions, kept.repeat_interleave(2, 0))
    assert torch.equal(cache.prompt_mask, prompt_mask.repeat_interleave(2, 0))
    cache.batch_select_indices(torch.tensor([1, 2]))
    assert torch.equal(layer.kept_positions, kept[[0, 1]]) and torch.equal(layer.keys, keys[[0, 1]])
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.kept_positions, kept[[1, 0]]) and torch.equal(cache.prompt_mask, prompt_mask[[1, 0]])
    assert cache.get_seq_length() == 31


@pytest.mark.parametrize("assistant_kind", ["unrelated", "target_weights"])
def test_assisted_decoding_matches_plain_greedy_and_oracle(models, assistant_kind):
    # Assisted decoding's first forward is prompt + the assistant's candidates: only the prompt may be compressed,
    # and greedy assisted decoding must give exactly what plain greedy decoding gives with the same cache.
    target, draft = models
    if assistant_kind == "unrelated":  # rejects most candidates: every step crops the appended tokens
        assistant = tiny_model("llama", seed=13, num_layers=1)
    else:  # the target's weights with a full cache: accepts until the compressed target disagrees
        assistant = tiny_model("qwen2", seed=11, num_heads=4, num_kv_heads=2)
    ids, mask = random_batch(1, 30, [0], seed=10)
    plain = target.generate(input_ids=ids, attention_mask=mask, past_key_values=make_cache(draft), max_new_tokens=8,
                            do_sample=False, **GEN)
    cache = make_cache(draft)
    assisted = target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, assistant_model=assistant,
                               max_new_tokens=8, do_sample=False, **GEN)  # 4.x refuses min_new_tokens here
    assert cache.prompt_length == 30 and cache.is_compressed and assisted.sequences.shape[1] == 38
    assert torch.equal(assisted.sequences, plain.sequences)
    assert_matches_oracle(target, cache, ids, mask, assisted)


def test_speculative_sampling_matches_oracle(models):
    target, draft = models
    ids, mask = random_batch(1, 30, [0], seed=11)
    cache = make_cache(draft)
    torch.manual_seed(0)
    out = target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, do_sample=True, top_k=0,
                          assistant_model=tiny_model("qwen2", seed=11, num_heads=4, num_kv_heads=2),
                          max_new_tokens=8, **GEN)
    assert cache.prompt_length == 30
    assert_matches_oracle(target, cache, ids, mask, out)
