"""One rank-aware logging set-up, made at start by every entry point and tool.

Library modules log through `logging.getLogger(__name__)` (the `megatron_ext.*` tree) and never
print. `setup_logging` sends that tree to stdout as plain lines: INFO and up on the logging
rank (rank 0 unless told otherwise), warnings and errors only on the others, so a 64-rank job
prints each message once. Megatron-Core's own loggers are held at WARNING (their INFO lines
describe internals: dataset index building, rerun state machine, scheduler overrides).
"""

from __future__ import annotations

import logging
import os
import sys

_HANDLER_TAG = "_marco_handler"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is when a record is emitted, not the stream of the
    set-up: a caller that redirects or captures stdout later (a notebook, a test runner, a tool
    run in-process twice) gets the lines, and a stream closed since is never written to."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property decides
        pass


def setup_logging(rank: int | None = None, logging_rank: int = 0, verbose: bool = False) -> None:
    """Idempotent; call again after the rank is known (e.g. once torch.distributed is up)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    ours = logging.getLogger("megatron_ext")
    level = logging.DEBUG if verbose else logging.INFO
    ours.setLevel(level if rank == logging_rank else logging.WARNING)
    if not any(getattr(h, _HANDLER_TAG, False) for h in ours.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        setattr(handler, _HANDLER_TAG, True)
        ours.addHandler(handler)
    ours.propagate = False
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # Printed as a warning at every start although it only says the (default) mode.
    logging.getLogger("megatron.core.rerun_state_machine").setLevel(logging.ERROR)
