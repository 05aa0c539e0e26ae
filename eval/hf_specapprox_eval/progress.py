"""What the command line shows while it works: which method, which stage, how many tokens.

Stages come from the library's own log lines (the `hf_specapprox` loggers at INFO: the draft's preview, the target's
scoring prefill) and a token counter from `generate`'s streamer interface, drawn with transformers' `tqdm` (so
`transformers.utils.logging.disable_progress_bar()` silences it too). Nothing is shown when asked (`--quiet`) or when
standard error is not a terminal.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

from transformers.generation.streamers import BaseStreamer
from transformers.utils.logging import tqdm


def wanted(quiet: bool) -> bool:
    """Whether to show progress: not asked to be quiet, and standard error is a terminal."""
    return not quiet and sys.stderr.isatty()


@contextmanager
def stage_lines(enabled: bool):
    """Within the block, the library's stage log lines (INFO) go to standard error, prefixed."""
    if not enabled:
        yield
        return
    library = logging.getLogger("hf_specapprox")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("  [%(name)s] %(message)s"))
    previous = library.level
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.setLevel(previous)


def say(enabled: bool, message: str) -> None:
    """A stage line of the command itself (which method, what it does)."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


class TokenProgress(BaseStreamer):
    """A `generate` streamer that counts the answer's tokens on a progress bar (the prompt's `put` is skipped)."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        self.bar = tqdm(total=total, desc=description, unit="tok", leave=False, disable=not enabled)
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.bar.update(1)

    def end(self):
        self.bar.close()


__all__ = ["TokenProgress", "say", "stage_lines", "wanted"]
