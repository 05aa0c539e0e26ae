"""Configs like transformers' own: dict / JSON round trips, storage in a `GenerationConfig`, validation at use."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
from transformers import GenerationConfig

import hf_specapprox as hs
from hf_specapprox.config import GENERATION_CONFIG_KEY

# One non-default instance per config class, with its fields written out by hand (the oracle for `to_dict`).
BUDGET_DEFAULTS = {"layer_budgets": "uniform", "pyramid_beta": 20}
SPARSE_DEFAULTS = {**BUDGET_DEFAULTS, "sparse_prefill": "off", "sparse_prefill_threshold": 4096, "prefill_vertical_size": 2048,
                   "prefill_window_size": 2048, "prefill_block_size": 64}
CASES = [
    (hs.KVSelectionConfig(max_capacity_prompt=77), {"max_capacity_prompt": 77, **BUDGET_DEFAULTS}),
    (hs.KnormConfig(max_capacity_prompt=50, layer_budgets="pyramid", pyramid_beta=4),
     {"max_capacity_prompt": 50, "layer_budgets": "pyramid", "pyramid_beta": 4}),
    (hs.AttentionSelectionConfig(max_capacity_prompt=90, window_size=9, kernel_size=3, pool_type="mean"),
     {"max_capacity_prompt": 90, "window_size": 9, "kernel_size": 3, "pool_type": "mean", "reduction_type": "max",
      "scoring_implementation": "auto", **SPARSE_DEFAULTS}),
    (hs.SpecKVConfig(max_capacity_prompt=128, window_size=16, lookahead_tokens=0, scoring_implementation="torch"),
     {"max_capacity_prompt": 128, "window_size": 16, "kernel_size": 7, "pool_type": "max", "reduction_type": "max",
      "scoring_implementation": "torch", **SPARSE_DEFAULTS, "lookahead_tokens": 0, "sparse_prefill": "auto",
      "lookahead_decoding": "generation_config"}),
    (hs.SnapKVConfig(max_capacity_prompt=64, window_size=8),
     {"max_capacity_prompt": 64, "window_size": 8, "kernel_size": 7, "pool_type": "max", "reduction_type": "mean",
      "scoring_implementation": "auto", **SPARSE_DEFAULTS}),
    (hs.StreamingLLMConfig(max_capacity_prompt=40, num_sink_tokens=0), {"max_capacity_prompt": 40, **BUDGET_DEFAULTS,
                                                                       "num_sink_tokens": 0}),
    (hs.SpecPCConfig(max_capacity_prompt=300, window_size=30, kernel_size=8, neighbor_tokens=2, weighted_query=False,
                     protected_token_ids=(5, 1), num_sink_tokens=2, starting_layer_index=1),
     {"max_capacity_prompt": 300, "window_size": 30, "lookahead_tokens": 1, "lookahead_decoding": "generation_config",
      "kernel_size": 8, "neighbor_tokens": 2,
      "pool_type": "max", "starting_layer_index": 1, "weighted_query": False, "num_sink_tokens": 2,
      "protected_token_ids": [5, 1], "scoring_implementation": "auto"}),
]
IDS = [type(config).__name__ for config, _ in CASES]


@pytest.mark.parametrize("config, expected", CASES, ids=IDS)
def test_dict_and_json_round_trips(config, expected, tmp_path):
    assert config.to_dict() == expected
    assert json.loads(config.to_json_string()) == expected
    cls = type(config)
    assert cls.from_dict(expected) == config
    assert cls.from_json_string(config.to_json_string()) == config
    path = tmp_path / "config.json"
    config.to_json_file(path)
    assert json.loads(path.read_text()) == expected
    assert cls.from_json_file(path) == config


@pytest.mark.parametrize("config, expected", CASES, ids=IDS)
def test_generation_config_round_trip_through_save_and_load(config, expected, tmp_path):
    generation_config = GenerationConfig(max_new_tokens=7, do_sample=False)
    config.to_generation_config(generation_config)
    assert getattr(generation_config, GENERATION_CONFIG_KEY) == {"method": config.method, **expected}
    generation_config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "generation_config.json").read_text())
    assert on_disk[GENERATION_CONFIG_KEY] == {"method": config.method, **expected}
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert loaded.max_new_tokens == 7
    assert type(config).from_generation_config(loaded) == config


def test_stored_config_rides_along_with_generate(tmp_path):
    from tiny_models import random_batch, tiny_model

    model = tiny_model("llama", seed=31, num_layers=1)
    hs.SpecKVConfig(max_capacity_prompt=12, window_size=3).to_generation_config(model.generation_config)
    ids, mask = random_batch(1, 10, [0], seed=1)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert plain.shape == (1, 13)  # generate accepts the extra attribute
    model.save_pretrained(tmp_path)
    reloaded = GenerationConfig.from_pretrained(tmp_path)
    assert hs.SpecKVConfig.from_generation_config(reloaded) == hs.SpecKVConfig(max_capacity_prompt=12, window_size=3)


def test_bad_serialised_input_raises_clearly():
    with pytest.raises(ValueError, match=r"no field\(s\) \['max_capacity_promt'\]"):
        hs.SpecKVConfig.from_dict({"max_capacity_promt": 12})
    with pytest.raises(ValueError, match=r"no field\(s\) \['method'\]"):
        hs.SpecPCConfig.from_dict({"method": "specpc"})
    with pytest.raises(TypeError, match="needs a dict"):
        hs.SpecKVConfig.from_dict([("window_size", 3)])
    with pytest.raises(ValueError, match="not valid JSON"):
        hs.SpecKVConfig.from_json_string("{window_size: 3}")
    with pytest.raises(ValueError, match="must be larger than `window_size`"):  # values are validated
        hs.SpecKVConfig.from_json_string('{"max_capacity_prompt": 8, "window_size": 8}')
    with pytest.raises(ValueError, match=f"no `{GENERATION_CONFIG_KEY}` entry"):
        hs.SpecKVConfig.from_generation_config(GenerationConfig())
    generation_config = GenerationConfig()
    hs.SnapKVConfig().to_generation_config(generation_config)
    with pytest.raises(ValueError, match="for method 'snapkv', not 'speckv'"):
        hs.SpecKVConfig.from_generation_config(generation_config)


def test_every_config_dataclass_serialises():
    import hf_specapprox.config as config_module

    classes = {cls for cls in vars(config_module).values()
               if isinstance(cls, type) and cls.__module__ == config_module.__name__ and hasattr(cls, "__dataclass_fields__")}
    assert classes | {hs.KnormConfig} == {type(config) for config, _ in CASES}  # Knorm's lives in knorm.py
    for config, expected in CASES:  # every field is covered by the hand-written dicts
        assert set(expected) == {field.name for field in fields(config)}


# Validation (issue 11, items 3 and 9) --------------------------------------------------------------------------------


def test_specpc_refuses_a_window_larger_than_the_budget():
    with pytest.raises(ValueError, match=r"Lower `window_size` to at most 32"):
        hs.SpecPCConfig(max_capacity_prompt=32)  # the default window is 64
    assert hs.SpecPCConfig(max_capacity_prompt=32, window_size=32).window_size == 32


def test_weighted_query_must_be_a_bool():
    for value in ("no", 0, 1, None):
        with pytest.raises(TypeError, match="`weighted_query` must be True or False"):
            hs.SpecPCConfig(weighted_query=value)


def test_protected_token_ids():
    assert hs.SpecPCConfig(protected_token_ids=None).protected_token_ids == ()
    assert hs.SpecPCConfig(protected_token_ids=[4, 9]).protected_token_ids == (4, 9)
    assert hs.SpecPCConfig(protected_token_ids=7).protected_token_ids == (7,)  # one id
    with pytest.raises(TypeError, match="sequence of token ids"):
        hs.SpecPCConfig(protected_token_ids="w5")
    with pytest.raises(TypeError, match="integer token ids"):
        hs.SpecPCConfig(protected_token_ids=[True])
    with pytest.raises(TypeError, match="integer token ids"):
        hs.SpecPCConfig(protected_token_ids=[2.5])


def test_booleans_never_pass_as_ints():
    with pytest.raises(TypeError, match="must be an int"):
        hs.SpecKVConfig(lookahead_tokens=True)
    with pytest.raises(TypeError, match="must be an int"):
        hs.SpecPCConfig(num_sink_tokens=False)


@pytest.mark.parametrize("config, edit, error", [
    (hs.SpecKVConfig(max_capacity_prompt=6, window_size=2), dict(window_size=8), "must be larger than `window_size`"),
    (hs.SpecPCConfig(max_capacity_prompt=100), dict(max_capacity_prompt=10), "Lower `window_size`"),
    (hs.SpecPCConfig(), dict(weighted_query="no"), "True or False"),
    (hs.StreamingLLMConfig(max_capacity_prompt=8), dict(num_sink_tokens=8), "smaller than `max_capacity_prompt`"),
], ids=["speckv", "specpc-window", "specpc-weighted", "streamingllm"])
def test_validate_is_public_and_catches_edits(config, edit, error):
    config.validate()
    for name, value in edit.items():
        setattr(config, name, value)
    with pytest.raises((TypeError, ValueError), match=error):
        config.validate()


def test_an_edited_protected_token_ids_round_trips_equal():
    """Before: a list assigned after construction validated, but the JSON round trip gave a tuple (not `==`)."""
    config = hs.SpecPCConfig()
    config.protected_token_ids = [5, 9]
    assert config.protected_token_ids == (5, 9)
    assert hs.SpecPCConfig.from_dict(config.to_dict()) == config
    assert hs.SpecPCConfig.from_json_string(config.to_json_string()) == config
    config.protected_token_ids = torch.tensor([3, 4])
    assert config.protected_token_ids == (3, 4) and all(type(i) is int for i in config.protected_token_ids)
