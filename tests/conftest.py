"""`slow` tests (subprocesses, the docs' code blocks, multi-process runs) run everywhere by default; the middle tox
environments set HF_SPECAPPROX_SKIP_SLOW=1 because those tests exercise no version seam the floor and newest
environments do not already cover.

HF_SPECAPPROX_UPSTREAM=1 (the `upstream` tox env: transformers patched with the proposed `Cache.prepare_prefill` hook,
see upstream/) counts the hook's calls made by transformers' `generate` and fails the session unless there were some
and `bind` never installed its `generate` wrapper or forward pre-hook (the native hook does their work there).
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest

UPSTREAM = os.environ.get("HF_SPECAPPROX_UPSTREAM") == "1"
_UPSTREAM_COUNTS: Counter = Counter()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("HF_SPECAPPROX_SKIP_SLOW") != "1":
        return
    skip = pytest.mark.skip(reason="slow test: runs in the floor and newest tox envs (HF_SPECAPPROX_SKIP_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _count_the_native_prepare_prefill_hook():
    """In the `upstream` env: counts `prepare_prefill` calls by transformers' `generate` (and the explicit ones), and
    the binding hooks `bind` installs (there must be none)."""
    if not UPSTREAM:
        yield
        return
    from hf_specapprox import compat
    from hf_specapprox.kv import binding
    from hf_specapprox.kv.cache import KVCompressionCache

    assert compat.has_native_prepare_prefill(), (
        "HF_SPECAPPROX_UPSTREAM=1 needs transformers patched with upstream/*.patch (`Cache.prepare_prefill`)")
    original_prepare = KVCompressionCache.prepare_prefill
    original_wrapper_init = binding._BoundGenerate.__init__
    original_binding_init = binding._Binding.__init__

    def counted_prepare(self, *args, **kwargs):
        caller = sys._getframe(1)
        native = caller.f_globals.get("__name__") == "transformers.generation.utils"
        _UPSTREAM_COUNTS["native hook calls" if native else "explicit calls"] += 1
        return original_prepare(self, *args, **kwargs)

    def counted_wrapper_init(self, *args, **kwargs):
        _UPSTREAM_COUNTS["generate wrappers"] += 1
        original_wrapper_init(self, *args, **kwargs)

    def counted_binding_init(self, hook, *args, **kwargs):
        _UPSTREAM_COUNTS["bindings"] += 1
        _UPSTREAM_COUNTS["forward pre-hooks"] += hook is not None
        original_binding_init(self, hook, *args, **kwargs)

    KVCompressionCache.prepare_prefill = counted_prepare
    binding._BoundGenerate.__init__ = counted_wrapper_init
    binding._Binding.__init__ = counted_binding_init
    try:
        yield
    finally:
        KVCompressionCache.prepare_prefill = original_prepare
        binding._BoundGenerate.__init__ = original_wrapper_init
        binding._Binding.__init__ = original_binding_init


def _upstream_violations() -> list[str]:
    problems = []
    if _UPSTREAM_COUNTS["native hook calls"] == 0:
        problems.append("transformers' generate never called KVCompressionCache.prepare_prefill")
    for name in ("generate wrappers", "forward pre-hooks"):
        if _UPSTREAM_COUNTS[name]:
            problems.append(f"bind installed binding hooks ({name}: {_UPSTREAM_COUNTS[name]})")
    return problems


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if UPSTREAM:
        names = ("native hook calls", "explicit calls", "bindings", "generate wrappers", "forward pre-hooks")
        counts = ", ".join(f"{name}: {_UPSTREAM_COUNTS[name]}" for name in names)
        terminalreporter.write_line(f"upstream mode (native Cache.prepare_prefill): {counts}")
        for problem in _upstream_violations():
            terminalreporter.write_line(f"upstream mode FAILED: {problem}", red=True)


def pytest_sessionfinish(session, exitstatus):
    if UPSTREAM and session.testscollected and _upstream_violations():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
