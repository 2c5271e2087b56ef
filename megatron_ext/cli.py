"""What every command-line tool shares: quiet imports, the usage-error type, output checks,
all-or-nothing output directories and the one-line `error: ...` exit (status 2)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings

from megatron_ext.errors import UsageError  # noqa: F401 - the tools import it from here

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def quiet_imports() -> None:
    """Megatron-Core, TE probes and transformers warn at import about things that do not matter
    to a conversion tool (missing apex/TE, deprecations); keep the output to the tool's own."""
    for pattern in (".*[Aa]pex.*", ".*Transformer Engine.*", ".*transformer_engine.*",
                    ".*nvidia_resiliency.*", ".*deprecated.*", ".*torch.distributed.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def require_single_process(why: str = "the output loads at any parallel layout") -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(f"run as a single process (not under torchrun); {why}")


def require_empty_output(path: str, flag: str, overwrite: bool) -> None:
    """An output directory must be absent or empty, unless --overwrite."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise UsageError(f"{flag} {path} exists and is not empty; pass --overwrite to replace it")


def torch_dtype(choice: str, found):
    """--dtype auto|fp32|bf16 -> a torch dtype; auto keeps `found` if it is fp32 or bf16."""
    import torch

    dtype = found if choice == "auto" else getattr(torch, DTYPES[choice])
    return dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


@contextlib.contextmanager
def atomic_directory(target: str, tag: str):
    """Yields a fresh sibling directory of `target` to write into. When the block succeeds it
    becomes `target` (replacing an old one); when it fails nothing is left behind: not the
    temporary, not the parent directories it needed, and an old `target` stays in place."""
    target = os.path.abspath(target)
    tmp, old = f"{target}.tmp-{tag}-{os.getpid()}", f"{target}.old-{tag}-{os.getpid()}"
    created = None  # the topmost missing parent, removed again on failure
    parent = os.path.dirname(target)
    while not os.path.isdir(parent):
        created, parent = parent, os.path.dirname(parent)
    done = False
    try:
        os.makedirs(tmp)
        yield tmp
        if os.path.exists(target):
            os.replace(target, old)
        os.replace(tmp, target)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if done:
            shutil.rmtree(old, ignore_errors=True)
        else:
            if os.path.exists(old) and not os.path.exists(target):
                os.replace(old, target)
            if created:
                shutil.rmtree(created, ignore_errors=True)


def entry_point(main, argv=None) -> int:
    """The training entry points' start-up and error tail (pretrain_marco.py,
    posttrain_marco.py): quiet imports, rank-aware logging, one `error: ...` line from rank 0
    and exit 2 for any MarcoError, and Megatron's process groups torn down whatever happened."""
    from megatron_ext.errors import MarcoError, report
    from megatron_ext.logs import setup_logging

    quiet_imports()
    setup_logging()
    try:
        return main(argv)
    except MarcoError as e:
        return report(e)
    finally:
        from megatron_ext import parallel

        parallel.shutdown()
