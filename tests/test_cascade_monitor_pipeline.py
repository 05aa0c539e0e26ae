"""SpecKV-PC, the agreement monitor and the pipeline."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, pipeline

import hf_specapprox as hs
from oracle import oracle_logits
from tiny_models import random_batch, tiny_model, tiny_tokenizer, words

SPECKV = dict(max_capacity_prompt=16, window_size=4, lookahead_tokens=4)
SPECPC = dict(max_capacity_prompt=24, window_size=4, kernel_size=3, starting_layer_index=1, lookahead_tokens=5)


@pytest.fixture(scope="module")
def models():
    return tiny_model("qwen2", seed=1, num_heads=4, num_kv_heads=2), tiny_model("llama", seed=2, num_layers=2)


def test_speckv_pc_reuses_specpc_draft_tokens_and_matches_oracle(models):
    target, draft = models
    calls = []
    handle = draft.register_forward_pre_hook(lambda *a: calls.append(1))
    cascade = hs.SpecKVPC(draft, hs.SpecPCConfig(**SPECPC), hs.SpecKVConfig(**SPECKV))
    ids, mask = random_batch(2, 60, [0, 11], seed=3)
    compressed, out = cascade.compress_and_generate(target, ids, mask, max_new_tokens=3, min_new_tokens=3,
                                                    do_sample=False, pad_token_id=0, output_logits=True,
                                                    return_dict_in_generate=True)
    handle.remove()
    assert len(calls) <= SPECPC["lookahead_tokens"]  # one greedy pass of the draft, during SpecPC only
    cache = out.past_key_values
    assert torch.equal(cache.lookahead_ids, compressed.draft_tokens)
    kept = {i: cache.kept_positions(i) for i in range(len(cache.layers)) if cache.kept_positions(i) is not None}
    prompt = compressed.input_ids
    valid = torch.cat([compressed.attention_mask.bool(), torch.ones(2, 2, dtype=torch.bool)], 1)
    expected = oracle_logits(target, out.sequences[:, :-1], valid, prompt.shape[1], kept)[:, prompt.shape[1] - 1 :]
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=1e-4, rtol=0)


def test_monitor_changes_nothing(models):
    target, draft = models
    ids, mask = random_batch(2, 30, [0, 4], seed=4)
    results = []
    for with_monitor in (False, True):
        cache = hs.SpecKVCache(draft=draft, model=target, **SPECKV)
        processors = LogitsProcessorList([hs.DraftAgreementMonitor(cache)] if with_monitor else [])
        torch.manual_seed(7)
        out = target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, do_sample=True,
                              max_new_tokens=6, logits_processor=processors, pad_token_id=0, output_scores=True,
                              return_dict_in_generate=True)
        results.append(out)
    assert torch.equal(results[0].sequences, results[1].sequences)
    assert all(torch.equal(a, b) for a, b in zip(results[0].scores, results[1].scores))


def test_monitor_agreement_equals_a_direct_count(models):
    target, _ = models
    ids, mask = random_batch(2, 20, [0, 3], seed=5)
    answer = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, pad_token_id=0)[:, 20:]
    draft_tokens = answer.clone()
    draft_tokens[0, 2] = (draft_tokens[0, 2] + 1) % 90 + 3  # row 0: misses at 2 and 4
    draft_tokens[0, 4] = (draft_tokens[0, 4] + 1) % 90 + 3
    draft_tokens[1, 0] = (draft_tokens[1, 0] + 1) % 90 + 3  # row 1: misses at 0; only 3 draft tokens count
    draft_valid = torch.ones_like(draft_tokens, dtype=torch.bool)
    draft_valid[1, 3:] = False
    monitor = hs.DraftAgreementMonitor(draft_tokens, draft_valid)
    out = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          pad_token_id=0, logits_processor=[monitor])
    assert torch.equal(out[:, 20:], answer)
    torch.testing.assert_close(monitor.agreement(out), torch.tensor([4 / 6, 2 / 3]))
    assert monitor.matched_prefix(out).tolist() == [2, 0]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def make_pipe(models, tokenizer, **kwargs):
    target, draft = models
    return pipeline("speckv-text-generation", model=target, tokenizer=tokenizer, draft_model=draft,
                    speckv_config=hs.SpecKVConfig(**SPECKV), specpc_config=hs.SpecPCConfig(**SPECPC), **kwargs)


@pytest.mark.parametrize("method", ["speckv", "specpc", "speckv-pc"])
def test_pipeline_batch_of_ragged_prompts_equals_manual_runs(models, tokenizer, method):
    target, draft = models
    prompts = [words(50, 1), words(35, 2), words(60, 3)]
    pipe = make_pipe(models, tokenizer, method=method)
    outputs = pipe(prompts, max_new_tokens=4, do_sample=False, batch_size=3, return_full_text=False)
    for prompt, output in zip(prompts, outputs):
        record = output[0]
        stats = record["hf_specapprox"]
        encoded = tokenizer(prompt, return_tensors="pt")
        n = encoded["input_ids"].shape[1]
        assert stats["prompt_tokens"] == n
        inputs = dict(encoded)
        kwargs = {}
        if method != "speckv":
            compressed = hs.SpecPCPreprocessor(draft, config=hs.SpecPCConfig(**SPECPC))(**inputs)
            assert stats["specpc_kept_tokens"] == min(SPECPC["max_capacity_prompt"], n)
            inputs = compressed.model_inputs
        if method != "specpc":
            kwargs["past_key_values"] = hs.SpecKVCache(
                draft=draft, model=target, **SPECKV,
                **({} if method == "speckv" else dict(lookahead_ids=compressed.draft_tokens,
                                                     lookahead_valid=compressed.draft_tokens_valid)),
            )
            assert stats["kv_kept_per_layer"] == SPECKV["max_capacity_prompt"]
        manual = target.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0, **kwargs)
        expected_text = tokenizer.decode(manual[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert record["generated_text"].strip() == expected_text.strip()  # 4.x keeps a leading space
        assert 0.0 <= stats["draft_agreement"] <= 1.0


def test_pipeline_with_a_prompt_within_the_budgets(models, tokenizer):
    record = make_pipe(models, tokenizer, method="speckv-pc")(words(10, 9), max_new_tokens=3, do_sample=False)[0]
    stats = record["hf_specapprox"]
    assert stats["prompt_tokens"] == 10 and stats["specpc_kept_tokens"] == 10
    assert stats["kv_kept_per_layer"] is None and stats["draft_agreement"] is None


def test_monitor_on_an_uncompressed_cache_reports_instead_of_breaking_generate(models):
    target, draft = models
    ids, mask = random_batch(1, 8, [0], seed=6)
    cache = hs.SpecKVCache(draft=draft, model=target, **SPECKV)
    monitor = hs.DraftAgreementMonitor(cache)
    out = target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3,
                          do_sample=False, pad_token_id=0, logits_processor=[monitor])
    assert out.shape[1] == 11
    with pytest.raises(ValueError, match="not compressed"):
        monitor.agreement(out)


def test_pipeline_full_text_starts_with_the_original_prompt(models, tokenizer):
    prompt = words(50, 4)
    pipe = make_pipe(models, tokenizer, method="speckv-pc")
    full = pipe(prompt, max_new_tokens=3, do_sample=False)[0]["generated_text"]
    new = pipe(prompt, max_new_tokens=3, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert full == prompt + new


def test_pipeline_chat_input(models, tokenizer):
    chat = [{"role": "user", "content": words(60, 5)}]
    pipe = make_pipe(models, tokenizer, method="speckv")
    record = pipe(chat, max_new_tokens=3, do_sample=False)[0]
    messages = record["generated_text"]
    assert messages[:-1] == chat and messages[-1]["role"] == "assistant"
    templated = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    templated = templated["input_ids"] if isinstance(templated, dict) or hasattr(templated, "keys") else templated
    assert record["hf_specapprox"]["prompt_tokens"] == len(templated)


def test_pipeline_class_argument_and_errors(models, tokenizer):
    target, draft = models
    pipe = pipeline("text-generation", model=target, tokenizer=tokenizer, draft_model=draft,
                    pipeline_class=hs.SpecApproxTextGenerationPipeline, speckv_config=hs.SpecKVConfig(**SPECKV))
    assert isinstance(pipe, hs.SpecApproxTextGenerationPipeline)
    assert "hf_specapprox" in pipe(words(40, 6), max_new_tokens=2, do_sample=False)[0]
    with pytest.raises(ValueError, match="draft_model="):
        pipeline("speckv-text-generation", model=target, tokenizer=tokenizer, assistant_model=draft)
    with pytest.raises(ValueError, match="same tokenizer"):
        pipeline("speckv-text-generation", model=target, tokenizer=tokenizer,
                 draft_model=tiny_model("llama", seed=3, num_layers=1, vocab_size=4000))
    with pytest.raises(ValueError, match="method"):
        pipeline("speckv-text-generation", model=target, tokenizer=tokenizer, draft_model=draft, method="lingua")
