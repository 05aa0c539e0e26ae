"""`hub/speckv`: the Hub `custom_generate` folder, loaded through transformers' own loader."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

import hf_specapprox as hs
from test_oracle import assert_matches_oracle
from tiny_models import random_batch, tiny_model

HUB_FOLDER = str(Path(__file__).resolve().parents[1] / "hub" / "speckv")


@pytest.fixture(scope="module")
def models():
    return tiny_model("qwen2", seed=21, num_heads=4, num_kv_heads=2), tiny_model("llama", seed=22, num_layers=1)


def test_custom_generate_compresses_and_matches_the_oracle(models):
    target, draft = models
    ids, mask = random_batch(2, 40, [0, 5], seed=3)
    out = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, output_logits=True, custom_generate=HUB_FOLDER,
                          trust_remote_code=True, draft_model=draft, max_capacity_prompt=12, window_size=3,
                          lookahead_tokens=4)
    cache = out.past_key_values
    assert isinstance(cache, hs.SpecKVCache)
    assert cache.kept_positions(0).shape[-1] == 12
    assert_matches_oracle(target, cache, ids, mask, out)
    assert not hs.is_bound(target)  # bound for the call only


def test_custom_generate_keeps_an_existing_binding(models):
    target, draft = models
    ids, mask = random_batch(1, 30, [0], seed=4)
    hs.bind(target)
    try:
        target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                        custom_generate=HUB_FOLDER, trust_remote_code=True, draft_model=draft,
                        max_capacity_prompt=12, window_size=3)
        assert hs.is_bound(target)
    finally:
        hs.unbind(target)


def test_custom_generate_errors_are_clear_and_leave_the_model_unbound(models):
    target, draft = models
    ids, mask = random_batch(1, 30, [0], seed=5)
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=2, custom_generate=HUB_FOLDER,
                  trust_remote_code=True)
    with pytest.raises(ValueError, match="draft_model="):
        target.generate(**common)
    with pytest.raises(ValueError, match="builds its own SpecKVCache"):
        target.generate(**common, draft_model=draft, cache_implementation="static")
    with pytest.raises(ValueError, match="not both"):
        target.generate(**common, draft_model=draft, speckv_config=hs.SpecKVConfig(), window_size=3)
    state = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError):  # raised inside generate, after binding
        target.generate(**common, draft_model=draft, max_capacity_prompt=12, window_size=40)
    assert not hs.is_bound(target)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in state.items())


def test_custom_generate_reads_its_knobs_from_the_generation_config(models, tmp_path):
    target, draft = models
    ids, mask = random_batch(2, 40, [0, 5], seed=6)
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True, custom_generate=HUB_FOLDER,
                  trust_remote_code=True, draft_model=draft)
    stored = hs.SpecKVConfig(max_capacity_prompt=14, window_size=3, lookahead_tokens=4)
    generation_config = copy.deepcopy(target.generation_config)
    stored.to_generation_config(generation_config)
    generation_config.save_pretrained(tmp_path)  # what a Hub repository's generation_config.json would carry
    loaded = GenerationConfig.from_pretrained(tmp_path)
    out = target.generate(**common, generation_config=loaded)
    assert out.past_key_values.kept_positions(0).shape[-1] == 14
    assert_matches_oracle(target, out.past_key_values, ids, mask, out)
    out = target.generate(**common, generation_config=loaded, max_capacity_prompt=10)  # a knob overrides the store
    assert out.past_key_values.kept_positions(0).shape[-1] == 10
    original = target.generation_config
    target.generation_config = loaded  # the model's own generation config is read when none is passed
    try:
        out = target.generate(**common)
    finally:
        target.generation_config = original
    assert out.past_key_values.kept_positions(0).shape[-1] == 14
