"""Ecosystem cases: PEFT-wrapped targets and drafts, an int8 weight-only draft, a bf16 draft beside an fp32 target,
accelerate device maps."""

from __future__ import annotations

import copy

import pytest
import torch

import hf_specapprox as hs
from test_oracle import assert_matches_oracle
from tiny_models import random_batch, tiny_model

GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)


def lora(model, seed):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"])
    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():  # adapters with a visible effect, whatever PEFT's initialisation (B = 0 by default)
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.1)
    return wrapped


@pytest.fixture(scope="module")
def pair():
    return tiny_model("qwen2", seed=31, num_heads=4, num_kv_heads=2), tiny_model("llama", seed=32, num_layers=10)


def test_lora_target_and_draft_with_speckv_match_the_oracle(pair):
    target, draft = pair
    lora_target, lora_draft = lora(target, 1), lora(draft, 2)
    ids, mask = random_batch(2, 40, [0, 6], seed=5)
    with torch.no_grad():  # the adapters are live: otherwise this test would prove nothing
        assert not torch.allclose(lora_target(input_ids=ids, attention_mask=mask).logits,
                                  target(input_ids=ids, attention_mask=mask).logits)
    cache = hs.SpecKVCache(draft=lora_draft, model=lora_target, max_capacity_prompt=12, window_size=3,
                           lookahead_tokens=4)
    assert hs.is_bound(lora_target) and hs.is_bound(lora_target.get_base_model())
    out = lora_target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GEN)
    assert_matches_oracle(lora_target.get_base_model(), cache, ids, mask, out)
    # The preview is the LoRA draft's own greedy continuation (transformers' generate as the reference).
    reference = lora_draft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                    pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(cache.lookahead_ids, reference)
    hs.unbind(lora_target)
    assert not hs.is_bound(lora_target.get_base_model())


def test_lora_draft_with_specpc_selects_like_the_merged_draft(pair):
    _, draft = pair
    lora_draft = lora(draft, 3)
    merged = copy.deepcopy(lora_draft).merge_and_unload()  # plain weights: no PEFT code at selection time
    ids, mask = random_batch(2, 120, [0, 9], seed=6)
    knobs = dict(max_capacity_prompt=40, window_size=8, kernel_size=5)
    with_adapter = hs.SpecPCPreprocessor(lora_draft, **knobs)(ids, mask)
    plain = hs.SpecPCPreprocessor(merged, **knobs)(ids, mask)
    torch.testing.assert_close(with_adapter.token_scores, plain.token_scores, atol=1e-4, rtol=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(with_adapter.kept_indices, plain.kept_indices))
    unadapted = hs.SpecPCPreprocessor(draft, **knobs)(ids, mask)
    assert (with_adapter.token_scores - unadapted.token_scores).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prompt_learning_adapters_are_refused_clearly(pair, method):
    peft = pytest.importorskip("peft")
    target, draft = pair
    config = (peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4) if method == "prefix"
              else peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    wrapped_target = peft.get_peft_model(copy.deepcopy(target), config)
    wrapped_draft = peft.get_peft_model(copy.deepcopy(draft), copy.deepcopy(config))
    with pytest.raises(ValueError, match="prompt-learning PEFT"):
        hs.bind(wrapped_target)
    assert not hs.is_bound(wrapped_target.get_base_model())
    with pytest.raises(ValueError, match="The draft uses prompt-learning"):
        hs.SpecKVCache(draft=wrapped_draft, max_capacity_prompt=12, window_size=3)
    with pytest.raises(ValueError, match="The draft uses prompt-learning"):
        hs.SpecPCPreprocessor(wrapped_draft, max_capacity_prompt=12, window_size=3)


def assert_draft_serves_speckv_and_specpc(target, draft, seed):
    """SpecKV with `draft` matches the masked-attention oracle and previews what `draft.generate` writes; SpecPC
    selects with it."""
    ids, mask = random_batch(2, 40, [0, 6], seed=seed)
    hs.bind(target)
    try:
        cache = hs.SpecKVCache(draft=draft, max_capacity_prompt=12, window_size=3, lookahead_tokens=4)
        out = target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GEN)
    finally:
        hs.unbind(target)
    assert_matches_oracle(target, cache, ids, mask, out)
    reference = draft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                               pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(cache.lookahead_ids, reference)
    compressed = hs.SpecPCPreprocessor(draft, max_capacity_prompt=16, window_size=4)(ids, mask)
    assert compressed.stats["kept_tokens"] == [16, 16]


def test_int8_weight_only_draft(pair, tmp_path):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    target, draft = pair
    draft.save_pretrained(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    weight = quantized.model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ != "Parameter" and "Int8" in type(weight).__name__  # really quantized
    assert_draft_serves_speckv_and_specpc(target, quantized, seed=7)


def test_bf16_draft_with_an_fp32_target(pair):
    """The preview only hands the target token ids, so a draft may run in another dtype (the cheapest lever on a CPU
    with bf16 units, docs/benchmarks.md); SpecPC scores with the bf16 draft's own attention."""
    target, draft = pair
    half = copy.deepcopy(draft).to(torch.bfloat16)
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert next(target.parameters()).dtype == torch.float32
    assert_draft_serves_speckv_and_specpc(target, half, seed=8)


def test_split_device_map_with_disk_offload(pair, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    target, draft = pair
    target.save_pretrained(tmp_path / "target")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "disk"}
    split = AutoModelForCausalLM.from_pretrained(tmp_path / "target", device_map=device_map,
                                                 offload_folder=str(tmp_path / "offload")).eval()
    assert hasattr(split.model.layers[1], "_hf_hook")  # accelerate moves that layer's weights in per forward
    ids, mask = random_batch(2, 40, [0, 6], seed=8)
    cache = hs.SpecKVCache(draft=draft, model=split, max_capacity_prompt=12, window_size=3, lookahead_tokens=4)
    out = split.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GEN)
    assert_matches_oracle(split, cache, ids, mask, out)
    hs.unbind(split)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_target_on_gpu_with_cpu_offloaded_layers_and_the_draft_on_cpu(pair, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    target, draft = pair
    target.save_pretrained(tmp_path / "target")
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                  "model.norm": "cpu", "lm_head": "cpu"}
    split = AutoModelForCausalLM.from_pretrained(tmp_path / "target", device_map=device_map).eval()
    ids, mask = random_batch(2, 40, [0, 6], seed=9)
    ids, mask = ids.cuda(), mask.cuda()
    cache = hs.SpecKVCache(draft=draft, model=split, max_capacity_prompt=12, window_size=3, lookahead_tokens=4)
    out = split.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GEN)
    # accelerate executes "cpu" entries on the GPU (weights stream in per forward): the cache lives there too.
    assert hasattr(split.model.layers[1], "_hf_hook")
    assert all(layer.keys.device.type == "cuda" for layer in cache.layers)
    assert cache.lookahead_ids.device.type == "cuda"  # the CPU draft's preview was moved to the prompt's device
    assert_matches_oracle(split, cache, ids, mask, out)
    hs.unbind(split)
