"""Every example runs on tiny models and does what it prints."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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
    assert cache.get_seq_length() == second.shape[1] - 1
    assert cache.layers[0].keys.shape[-2] == 65 + (second.shape[1] - 1 - 400)  # 64 kept + every later token


def test_speckv_pc():
    out, compressed = load("speckv_pc").main([])
    assert compressed.stats["kept_tokens"] == [192]
    assert 192 < out.shape[1] <= 192 + 12
