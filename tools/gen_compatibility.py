"""Writes docs/compatibility.md from tox.ini's environments (run after editing tox.ini; a test checks the result)."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _skip_slow(tox_ini: str) -> set[str]:
    match = re.search(r"^\s*([\w,]+): HF_SPECAPPROX_SKIP_SLOW = 1$", tox_ini, re.M)
    return set(match[1].split(",")) if match else set()


def render(tox_ini: str) -> str:
    seams = dict(re.findall(r"^#\s+(\w+): (.+)$", tox_ini, re.M))
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(tox_ini)
    envs = [env.strip() for env in parser["tox"]["envlist"].split(",")]
    deps = [line.strip() for line in parser["testenv"]["deps"].splitlines() if line.strip()]
    common = [dep for dep in deps if ":" not in dep.split("==")[0].split(">=")[0]]
    lines = [
        "# Compatibility",
        "",
        "<!-- Generated from tox.ini by tools/gen_compatibility.py; do not edit by hand. -->",
        "",
        "Every environment below runs the test suite on CPU in CI (`tox`), Python 3.11, with "
        + ", ".join(f"`{dep}`" for dep in common) + ".",
        "",
        "Tests marked `slow` (subprocesses, the docs' code blocks, multi-process runs) run only in "
        + ", ".join(f"`{env}`" for env in envs if env not in _skip_slow(tox_ini))
        + "; the others set `HF_SPECAPPROX_SKIP_SLOW=1`.",
        "",
        "| tox env | transformers | extra packages | why this version |",
        "|---|---|---|---|",
    ]
    for env in envs:
        own = [dep.split(":", 1)[1].strip() for dep in deps if dep.startswith(f"{env}:")]
        transformers = next((dep.removeprefix("transformers") for dep in own if dep.startswith("transformers")), "")
        extras = ", ".join(f"`{dep}`" for dep in own if not dep.startswith("transformers")) or "—"
        lines.append(f"| `{env}` | `{transformers}` | {extras} | {seams.get(env, '')} |")
    lines += [
        "",
        "Every version difference the library depends on is handled in `hf_specapprox/compat.py`, one function per",
        "seam. Outside CI, the suite has also been run on an NVIDIA H200 (torch 2.11, Triton 3.6, transformers 5.17),",
        "where the Triton kernels run natively; see [benchmarks](benchmarks.md).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    (ROOT / "docs" / "compatibility.md").write_text(render((ROOT / "tox.ini").read_text()))
