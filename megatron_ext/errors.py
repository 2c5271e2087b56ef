"""One root for every error a user can cause: `MarcoError`.

Every user-facing error (a bad flag, a parallel layout that cannot work, a checkpoint that is
missing or corrupt, data that does not parse, a tool's bad input) subclasses `MarcoError`, and
its message is one line that names the flag, file or value at fault and what was expected.
Entry points and tools catch `MarcoError` once (`report`): the message goes to stderr as
`error: ...` from one rank and the process exits with status 2. Anything else is a bug and
keeps its traceback.

The subclasses live here so that any module can raise them without importing the module
that owns the concept (and the Megatron stack behind it).
"""

from __future__ import annotations

import os
import sys

EXIT_USAGE = 2


class MarcoError(ValueError):
    """Bad input, named in a one-line message. (A ValueError for callers that predate it.)"""


class ConfigError(MarcoError):
    """A bad flag or flag combination; the message names the flag."""


class LayoutError(MarcoError):
    """A parallel layout that cannot work; the message names the sizes involved."""


class CheckpointError(MarcoError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit; names the path."""


class DataConfigError(MarcoError):
    """Bad data flags, data files or curriculum; the message names the flag or file."""


class UsageError(MarcoError):
    """A tool's bad input, named by the flag or file at fault."""


class ConversionError(MarcoError):
    """A checkpoint or directory that cannot be converted (HF <-> Megatron); names it."""


class TrainingError(MarcoError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


def report(error: BaseException, rank: int | None = None) -> int:
    """Print `error: <message>` (first line only) on rank 0 and return the exit status 2."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        text = str(error).strip().splitlines()
        print(f"error: {text[0] if text else type(error).__name__}", file=sys.stderr, flush=True)
    return EXIT_USAGE
