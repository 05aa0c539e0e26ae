"""The documentation: the site builds in strict mode, and every code block that claims to run does run.

Conventions (also stated in docs/quickstart.md):
* ```python blocks run, in page order, in one namespace per page that starts with `target`, `draft` (tiny random
  models, a 10-layer draft), `tokenizer` (the in-process tokenizer), `prompts` (two long prompts) and `long_prompt`; a block preceded by
  `<!-- docs-test: skip (why) -->` is shown only (it needs real weights, a GPU, or a proposed transformers change).
* `<!-- docs-test: requires pkg ... -->` anywhere in a page skips its blocks where a package is missing.
* ```bash blocks are shown only, unless preceded by `<!-- docs-test: run -->`: then each command line runs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- docs-test: (?P<mark>[a-z]+)[^>]*-->\n)?```(?P<lang>\w+)\n(?P<code>.*?)\n```", re.S)


def code_blocks(page: Path, lang: str, default_run: bool):
    for match in BLOCK.finditer(page.read_text()):
        if match["lang"] != lang:
            continue
        mark = match["mark"]
        if (default_run and mark != "skip") or (not default_run and mark == "run"):
            yield match["code"]


def docs_namespace() -> dict:
    from hf_specapprox.testing import tiny_pair, tiny_tokenizer, words

    target, draft = tiny_pair(draft_layers=10)  # SpecPC's default voting layers (8 on) exist
    tokenizer = tiny_tokenizer()
    prompts = [words(420, seed=1), words(380, seed=2)]
    return dict(target=target, draft=draft, tokenizer=tokenizer, prompts=prompts, long_prompt=words(400, seed=3),
                inputs=tokenizer(prompts, return_tensors="pt", padding=True))


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(code_blocks(p, "python", True))], ids=lambda p: p.name)
def test_python_blocks_run(page, monkeypatch):
    for requirement in re.findall(r"<!-- docs-test: requires ([\w\s]+?) -->", page.read_text()):
        for package in requirement.split():
            pytest.importorskip(package)
    monkeypatch.chdir(ROOT)
    namespace = docs_namespace()
    for number, code in enumerate(code_blocks(page, "python", True)):
        try:
            exec(compile(code, f"{page.name}[block {number}]", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page.name}, python block {number} failed:\n{code}") from error


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(code_blocks(p, "bash", False))], ids=lambda p: p.name)
def test_bash_blocks_marked_run_do_run(page, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for code in code_blocks(page, "bash", False):
        for line in code.splitlines():
            command = line.split("#", 1)[0].strip()
            if not command:
                continue
            argv = shlex.split(command)
            if argv[0] == "hf-specapprox":  # the console script of the environment under test
                argv = [sys.executable, "-m", "hf_specapprox_eval.cli", *argv[1:]]
            done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{page.name}: `{command}` failed:\n{done.stderr[-3000:]}"


def test_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    assert (tmp_path / "api" / "index.html").exists()


def test_upstream_proposal_test_case_holds_with_the_change_and_fails_without(monkeypatch):
    """docs/upstream.md's test case, run with the proposed two lines applied to `GenerationMixin._prefill`."""
    import transformers
    from packaging import version
    from transformers.generation.utils import GenerationMixin

    if version.parse(transformers.__version__) < version.parse("5.24"):
        pytest.skip("the proposal is written against transformers >= 5.24 (`cache=` and `_prefill`)")
    page = (ROOT / "docs" / "upstream.md").read_text()
    code = re.search(r"<!-- docs-test: skip \(needs the proposed change[^>]*-->\n```python\n(.*?)\n```", page, re.S)[1]
    namespace = {}
    exec(compile(code, "upstream.md", "exec"), namespace)
    test_case = namespace["test_cache_prepare_prefill_sees_the_prompt_and_keeps_generate_exact"]
    from hf_specapprox import compat

    if compat.has_native_prepare_prefill():  # transformers patched with upstream/*.patch (the `upstream` tox env)
        test_case()
        return
    with pytest.raises(AssertionError):  # released transformers: the hook is never called
        test_case()
    original = GenerationMixin._prefill

    def proposed(self, input_ids, generation_config, model_kwargs, is_first_iteration=True):
        cache = model_kwargs.get("cache")
        if cache is not None and is_first_iteration and hasattr(cache, "prepare_prefill"):
            cache.prepare_prefill(self, input_ids, model_kwargs, generation_config)
        return original(self, input_ids, generation_config, model_kwargs, is_first_iteration)

    monkeypatch.setattr(GenerationMixin, "_prefill", proposed)
    test_case()


def test_compatibility_page_is_generated_from_tox_ini():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from gen_compatibility import render
    finally:
        sys.path.remove(str(ROOT / "tools"))
    tox_ini = (ROOT / "tox.ini").read_text()
    assert (ROOT / "docs" / "compatibility.md").read_text() == render(tox_ini), (
        "docs/compatibility.md is stale: run `python tools/gen_compatibility.py`")
    for env in ("tf456", "tf5"):
        assert f"| `{env}` |" in render(tox_ini)


def test_upstream_page_shows_the_exact_patch():
    page = (ROOT / "docs" / "upstream.md").read_text()
    patch = (ROOT / "upstream" / "transformers-5.24.0-cache-prepare-prefill.patch").read_text()
    assert f"```diff\n{patch.rstrip()}\n```" in page, "docs/upstream.md must show upstream/*.patch exactly"
