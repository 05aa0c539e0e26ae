"""`benchmarks/compare_checkouts.py table`: hand-made rounds, medians and ratios computed by hand."""

from __future__ import annotations

import json

from scripts import load_script


def load():
    return load_script("benchmarks/compare_checkouts.py")


def _round(path, commit, ttfts, tpots, warmup):
    calls = [dict(ttft_s=a, tpot_s=b) for a, b in zip(ttfts, tpots)]
    rows = [dict(method="stock", prompt_tokens=1024, runs=calls, warmup_s=warmup, skipped=None),
            dict(method="snapkv", prompt_tokens=1024, runs=[], warmup_s=0.0, skipped="too long")]
    path.write_text(json.dumps(dict(meta=dict(commit=commit, date="2026-12-08"), rows=rows)))


def test_table_gives_medians_over_every_call_of_a_checkout_and_their_ratio(tmp_path, capsys):
    _round(tmp_path / "old-1.json", "aaa", [0.1, 0.3], [0.002, 0.004], 5.0)
    _round(tmp_path / "old-2.json", "aaa", [0.2], [0.003], 7.0)  # old: TTFT median 0.2 s, TPOT 3 ms
    _round(tmp_path / "new-1.json", "bbb", [0.25, 0.3, 0.35], [0.006, 0.006, 0.009], 1.0)  # 0.3 s, 6 ms
    load().table(tmp_path)
    printed = capsys.readouterr().out
    assert "old: ['aaa'], 2 rounds; new: ['bbb'], 1 rounds" in printed
    assert "| stock | 1024 | 3/3 | 0.200 | 0.300 | **1.50** | 3.00 | 6.00 | **2.00** | 6.0 | 1.0 |" in printed
    assert "snapkv" not in printed  # skipped rows are left out
