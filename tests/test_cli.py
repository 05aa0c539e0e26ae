"""`hf-specapprox compress` and the budgets of every command (issue 11, item 8): output files, small budgets, bad
budgets and bad files. Each test reproduces a symptom of the code before the fix (noted per test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_specapprox.testing import words
from hf_specapprox_eval import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_models(monkeypatch):
    """Refusals come before any model is loaded (so neither the draft nor the scoring runs)."""

    def refuse(args):
        raise AssertionError("a model was loaded for a refused command")

    monkeypatch.setattr(cli, "_models", refuse)


@pytest.fixture
def document(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(words(200, seed=1))
    return path


def test_compress_out_json_keeps_the_compressed_text(document, tmp_path):
    # Before: the stats went to `--out` with the suffix `.json`, i.e. over `result.json` itself.
    out = tmp_path / "result.json"
    assert cli.main(["compress", "--tiny", str(document), "--budget", "100", "--out", str(out)]) == 0
    kept = out.read_text().split()
    assert len(kept) == 100 and set(kept) <= set(document.read_text().split())
    stats = json.loads((tmp_path / "result.stats.json").read_text())
    assert stats["original_tokens"] == 200 and stats["kept_tokens"] == 100


@pytest.mark.parametrize("out_name", ["notes.txt", "notes.stats.json"])
def test_compress_never_overwrites_its_input(tmp_path, out_name, no_models):
    # Before: `--out notes.txt` replaced the input with its compressed text.
    source = tmp_path / out_name
    text = words(80, seed=2)
    source.write_text(text)
    out = source if out_name == "notes.txt" else tmp_path / "notes.json"  # the stats would land on the input
    with pytest.raises(SystemExit, match="would overwrite"):
        cli.main(["compress", "--tiny", str(source), "--out", str(out)])
    assert source.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == [out_name]


def test_compress_budget_below_64_keeps_the_budget(document, tmp_path):
    # Before: SpecPC's 64-token window was kept whole, so `--budget 20` kept 64 tokens.
    assert cli.main(["compress", "--tiny", str(document), "--budget", "20"]) == 0
    assert len((tmp_path / "notes.compressed.txt").read_text().split()) == 20
    assert json.loads((tmp_path / "notes.compressed.stats.json").read_text())["kept_tokens"] == 20


@pytest.mark.parametrize("argv", [
    ["compress", "--tiny", "FILE", "--budget", "0"],
    ["compress", "--tiny", "FILE", "--budget", "-5"],
    ["compress", "--tiny", "FILE", "--budget", "ten"],
    ["demo", "--tiny", "--budget", "0"],
    ["demo", "--tiny", "--pc-budget", "-1"],
    ["eval", "--tiny", "--budgets", "32", "0"],
    ["bench", "--tiny", "--budget", "0"],
], ids=["compress-0", "compress-negative", "compress-word", "demo", "demo-pc", "eval", "bench"])
def test_nonpositive_budgets_are_one_line_usage_errors(argv, document, capsys, no_models):
    # Before: `--budget 0` ran the models and died in the config with a traceback.
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(document) if arg == "FILE" else arg for arg in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "positive integer" in err and "Traceback" not in err


@pytest.mark.parametrize("case", ["missing", "empty", "directory", "not-text"])
def test_bad_files_are_one_line_errors(tmp_path, case, no_models):
    # Before: FileNotFoundError, IsADirectoryError, UnicodeDecodeError tracebacks; an empty file was "compressed".
    path = tmp_path / "notes.txt"
    if case == "empty":
        path.write_text(" \n\n")
    elif case == "directory":
        path.mkdir()
    elif case == "not-text":
        path.write_bytes(b"\xff\xfe\x00\x81 binary")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compress", "--tiny", str(path)])
    message = str(exit_info.value.code)
    assert message.startswith(f"hf-specapprox: error: {path}:") and "\n" not in message
    assert not (tmp_path / "notes.compressed.txt").exists()


@pytest.mark.slow
def test_console_errors_print_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for argv in (["compress", str(tmp_path / "missing.txt")], ["compress", "--budget", "0", "x.txt"]):
        done = subprocess.run([sys.executable, "-m", "hf_specapprox_eval.cli", *argv], capture_output=True,
                              text=True, env=env, timeout=300)
        assert done.returncode != 0 and "Traceback" not in done.stderr
        assert "error:" in done.stderr.strip().splitlines()[-1]


def test_harness_small_prompt_budgets_keep_the_budget_and_warn(caplog):
    # Before: `run_method("specpc", budget=20)` kept 64 tokens (the window), silently.
    import torch

    from hf_specapprox.testing import tiny_pair
    from hf_specapprox_eval import run_method

    target, draft = tiny_pair()
    ids = torch.randint(3, 90, (1, 150), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with caplog.at_level("WARNING"):
        _, stats = run_method("specpc", target, draft, ids, mask, budget=21, max_new_tokens=2)
    assert stats["kept_tokens"] == [21]
    assert "SpecPC's `window_size` lowered from 64 to 21" in caplog.text
    _, stats = run_method("speckv_pc", target, draft, ids, mask, budget=8, pc_budget=40, max_new_tokens=2)
    assert stats["kept_tokens"] == [40]


def test_compress_out_folder_is_refused(document, tmp_path, no_models):
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit, match="is a folder"):
        cli.main(["compress", "--tiny", str(document), "--out", str(tmp_path / "out")])


def test_compress_never_overwrites_its_input_through_a_hard_link(document, tmp_path, no_models):
    """Issue 27, item 8. Before: `--out alias.txt`, a hard link to the input, overwrote the input (300 words -> 50)."""
    alias = tmp_path / "alias.txt"
    os.link(document, alias)
    text = document.read_text()
    with pytest.raises(SystemExit, match="would overwrite the input"):
        cli.main(["compress", "--tiny", str(document), "--out", str(alias)])
    assert document.read_text() == text


def test_compress_into_a_missing_folder_fails_before_any_work(document, tmp_path, no_models, monkeypatch):
    """Issue 27, item 20. Before: the models loaded and the draft ran, then a traceback."""
    monkeypatch.setattr(cli, "_draft_only", lambda args: (_ for _ in ()).throw(AssertionError("the draft loaded")))
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["compress", "--tiny", str(document), "--out", str(tmp_path / "missing" / "out.txt")])


def test_compress_loads_the_draft_only(document, monkeypatch):
    """Issue 28, item 5. Before: `compress` loaded the 6 GB target it never uses."""
    def no_target(*args, **kwargs):
        raise AssertionError("the target was loaded")

    monkeypatch.setattr(cli, "_models", no_target)
    assert cli.main(["compress", "--tiny", str(document), "--budget", "40"]) == 0


def test_compress_readable_marks_the_dropped_spans(tmp_path):
    """Issue 28, item 6: kept spans glued mid-word were hard to read; `--readable` puts a marker between them."""
    source = tmp_path / "notes.txt"
    source.write_text(words(200, seed=3))
    assert cli.main(["compress", "--tiny", str(source), "--budget", "40", "--readable", " [...] "]) == 0
    exact = (tmp_path / "notes.compressed.txt").read_text().split()
    readable = (tmp_path / "notes.compressed.readable.txt").read_text()
    assert "[...]" in readable
    assert readable.replace("[...]", " ").split() == exact  # the same tokens, with markers between spans
