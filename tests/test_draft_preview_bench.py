"""`benchmarks/draft_preview.py` at toy sizes: its rows' schema, and every eager variant writing the library loop's
tokens (stock `generate`, with a dynamic and with a static cache, under a repetition penalty)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "draft_preview.py"
ROW_KEYS = {"variant", "prompt_tokens", "new_tokens", "first_call_s", "prefill_s", "total_s", "decode_s_per_token",
            "tokens_equal", "runs"}


def test_tiny_run_writes_rows_and_the_loop_tokens(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("draft_preview", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["draft_preview.py", "--tiny", "--threads", "1", "--variants", "loop",
                                      "generate", "static", "--json", str(out)])
    module.main()
    rows = json.loads(out.read_text())["rows"]
    assert [row["variant"] for row in rows] == ["loop", "generate", "static"]
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["tokens_equal"], row
        assert row["new_tokens"] == 8 and row["prompt_tokens"] == 128
        assert row["total_s"] > 0 and row["prefill_s"] > 0
    assert "| static |" in capsys.readouterr().out
