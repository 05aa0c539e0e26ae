"""The examples run (on tiny models) and do what they print."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speckv_generate_example(capsys):
    out, cache = load("speckv_generate").main([])
    assert out.shape == (2, 316)
    assert cache.is_compressed and cache.layers[0].keys.shape[-2] == 64 + 16
    assert "kept per layer and KV head: 64" in capsys.readouterr().out
