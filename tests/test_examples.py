"""Every example runs on tiny models and does what it prints."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speckv_generate(capsys):
    out, cache = load("speckv_generate").main([])
    assert cache.is_compressed and cache.layers[0].keys.shape[-2] == 64 + 16
    assert "kept per layer and KV head: 64" in capsys.readouterr().out


def test_pipeline_methods():
    results = load("pipeline_methods").main([])
    assert results["specpc"][0][0]["hf_specapprox"]["specpc_kept_tokens"] == 128
    assert results["speckv"][0][0]["hf_specapprox"]["kv_kept_per_layer"] == 64


def test_agreement_monitor():
    agreement, prefix = load("agreement_monitor").main([])
    assert 0.0 <= agreement <= 1.0 and 0 <= prefix <= 16


def test_compress_once_ask_twice():
    first, second, cache = load("compress_once_ask_twice").main([])
    from oracle import continuation_keeps_the_cache

    assert cache.get_seq_length() == second.shape[1] - 1
    if continuation_keeps_the_cache():
        assert cache.layers[0].keys.shape[-2] == 65 + (second.shape[1] - 1 - 400)  # 64 kept + every later token
    else:  # the native hook: the follow-up prefilled again (64 kept + its last prompt token + the 7 fed answers)
        assert cache.layers[0].keys.shape[-2] == 64 + 8


def test_tensor_parallel_alone(capsys):
    out, cache = load("tensor_parallel").main([])  # under torchrun: tests/test_tensor_parallel.py
    assert cache.is_compressed and "tensor-parallel size 1, holds 2 KV head(s)" in capsys.readouterr().out


def test_speckv_pc():
    out, compressed = load("speckv_pc").main([])
    assert compressed.stats["kept_tokens"] == [192]
    assert 192 < out.shape[1] <= 192 + 12


def test_align_draft_lora(tmp_path):
    pytest.importorskip("peft")
    from hf_specapprox.testing import tiny_pair, tiny_tokenizer

    module = load("align_draft_lora")
    before, after, losses, student = module.main(
        ["--train", "4", "--heldout", "2", "--steps", "80", "--lr", "2e-2", "--save", str(tmp_path / "adapter")])
    assert sum(losses[-5:]) / 5 < losses[0]  # it learns the target's answers
    assert after["train"]["teacher_forced"] > before["train"]["teacher_forced"]
    for split in (before, after):
        for value in (*split["train"].values(), *split["heldout"].values()):
            assert 0.0 <= value <= 1.0
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    # The draft passed in is not modified: the adapter goes on a copy.
    target, draft = tiny_pair()
    snapshot = {name: value.clone() for name, value in draft.state_dict().items()}
    tokenizer = tiny_tokenizer()
    answers = module._target_answers(target, tokenizer, module._prompts(tokenizer, range(2), 200), 4)
    module.train_lora(draft, answers, steps=2, lr=1e-2, rank=4)
    assert draft.state_dict().keys() == snapshot.keys()
    assert all(torch.equal(snapshot[name], value) for name, value in draft.state_dict().items())


def test_shared_cache_pipeline():
    answers = load("shared_cache_pipeline").main([])
    assert len(answers) == 3 and all(shared == fresh for shared, fresh in answers)


def test_chat_over_a_document():
    answers, conversation, cache = load("chat_over_a_document").main([])
    assert len(answers) == 3 and cache.context.length > 400
