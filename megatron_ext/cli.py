"""What every command-line tool shares: quiet imports, the usage-error type, output checks and
the one-line `error: ...` exit (status 2) for bad input."""

from __future__ import annotations

import os
import sys
import warnings

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


class UsageError(ValueError):
    """Bad input named by the flag or file at fault; the tool prints it as one line."""


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
