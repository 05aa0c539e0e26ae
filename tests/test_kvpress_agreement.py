"""kvpress's SnapKV press as an independent reference for our SnapKVCache's selection (where kvpress installs:
it pins transformers < 5.3, so the tf457 tox environment carries it).

Importing kvpress patches transformers' attention functions for the whole process, so the comparison runs in a
child process and never imports kvpress into the test session.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import hf_specapprox as hs
from tiny_models import tiny_model


@pytest.mark.skipif(importlib.util.find_spec("kvpress") is None, reason="kvpress is not installed")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_snapkv_keeps_what_kvpress_snapkv_keeps(seed):
    here = Path(__file__).resolve().parent
    code = f"import test_kvpress_agreement as t; t.compare_with_kvpress({seed})"
    done = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(here)})
    assert done.returncode == 0, done.stderr[-4000:]


def compare_with_kvpress(seed: int) -> None:
    """Runs in a child process (see the module docstring)."""
    import kvpress

    target = tiny_model("qwen2", seed=40 + seed, num_heads=4, num_kv_heads=2)
    length, budget, window, kernel = 300, 100, 16, 5
    ids = torch.randint(3, 90, (1, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = DynamicCache()
        target(input_ids=ids, attention_mask=mask, past_key_values=full, use_cache=True)
        pressed = DynamicCache()
        # int(n * (1 - ratio)) == budget; kvpress's knobs set to ours: mean over the window and the grouped heads,
        # average pool of width `kernel`, the last `window` prompt tokens always kept.
        press = kvpress.SnapKVPress(compression_ratio=1 - (budget + 0.5) / length, window_size=window,
                                    kernel_size=kernel)
        with press(target):
            target(input_ids=ids, attention_mask=mask, past_key_values=pressed, use_cache=True)
    ours = hs.SnapKVCache(model=target, max_capacity_prompt=budget, window_size=window, kernel_size=kernel,
                          pool_type="mean", reduction_type="mean")
    target.generate(input_ids=ids, attention_mask=mask, past_key_values=ours, max_new_tokens=1, do_sample=False,
                    pad_token_id=0)
    hs.unbind(target)
    for layer in range(len(full.layers)):
        full_keys, kept_keys = full.layers[layer].keys[0], pressed.layers[layer].keys[0]
        for head in range(full_keys.shape[0]):
            # kvpress returns the kept keys themselves: find their positions among the full prompt's keys.
            theirs = torch.cdist(kept_keys[head], full_keys[head]).argmin(-1)
            mine = ours.kept_positions(layer)[0, head]
            # kvpress's window is the last `window` tokens (position L-1 included); ours ends at L-2 because the
            # last prompt token is re-fed after the compression (paper §2.1), so ours selects one more candidate.
            assert (length - 1) in theirs.tolist() and (length - 1) not in mine.tolist()
            assert len(set(theirs.tolist()) - {length - 1} - set(mine.tolist())) == 0
