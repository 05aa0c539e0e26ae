"""`benchmarks/same_answers.py compare`: hand-made runs, one answer changed."""

from __future__ import annotations

import json

from scripts import load_script


def load():
    return load_script("benchmarks/same_answers.py")


def test_compare_counts_answers_that_match_token_for_token(tmp_path, capsys):
    row = dict(task="niah_single", index=0, budget=128, seconds=1.0)
    before = {"library": "old", "rows": [dict(row, method="full", tokens=[1, 2], answer="a"),
                                         dict(row, method="speckv", tokens=[1, 2], answer="a"),
                                         dict(row, method="specpc", tokens=[5], answer="b")]}
    after = {"library": "new", "rows": [dict(row, method="full", tokens=[1, 2], answer="a"),
                                        dict(row, method="speckv", tokens=[1, 3], answer="a'")]}
    (tmp_path / "before.json").write_text(json.dumps(before))
    (tmp_path / "after.json").write_text(json.dumps(after))
    code = load().main(["compare", str(tmp_path / "before.json"), str(tmp_path / "after.json")])
    printed = capsys.readouterr().out
    assert code == 1  # one answer differs; the row missing after the change is not counted
    assert "1 of 2 answers token for token the same" in printed
    assert "| niah_single | 0 | speckv | 'a' | \"a'\" | no |" in printed
    assert "| niah_single | 0 | full | 'a' | 'a' | yes |" in printed
