"""What every command-line tool shares, so that each tool is its arguments and its work.

  run_tool            the one way a tool runs: quiet imports, parse, run; a `MarcoError` (any
                      user error, megatron_ext/errors.py) becomes one `error: ...` line and exit
                      status 2, an OSError while writing the output one line saying nothing was
                      written (exit 2). Anything else is a bug and keeps its traceback.
  atomic_directory    all-or-nothing output directories: written as a temporary sibling and
                      renamed at the end; temporaries left by killed runs are cleaned first.
  tool_parser, hf_to_mcore_parser, add_dtype_flag, add_expert_backend_flag
                      the parser a tool starts from (its docstring's first paragraph as the
                      description), with the flags of the HF -> Megatron converters, the
                      checkpoint --dtype flag the converters share, and --moe-expert-backend
                      (EXPERT_BACKEND_CHOICES) of every tool that builds a model.
  require_*, torch_dtype, human_bytes
                      the checks and formats several tools share; require_recorded_sha256 is
                      the check that a file a checkpoint records (its tokenizer) is unchanged.

A tool:

    def build_parser():
        p = tool_parser(__doc__)
        ...
    def run(args) -> int: ...           # raises MarcoError subclasses for bad input
    def main(argv=None) -> int:
        return run_tool(run, build_parser(), argv, output="save")
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import socket
import sys
import warnings
from typing import Callable, Optional

from megatron_ext.errors import MarcoError, UsageError, report
from megatron_ext.logs import setup_logging

__all__ = ["DTYPES", "UsageError", "add_dtype_flag", "atomic_directory", "fail", "hf_to_mcore_parser",
           "human_bytes", "quiet_imports", "remove_stale_temporaries", "require_empty_output",
           "require_recorded_sha256", "require_single_process", "run_tool", "tool_parser",
           "torch_dtype"]

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def quiet_imports() -> None:
    """Megatron-Core, TE probes and transformers warn at import about things that do not matter
    to a tool (missing apex/TE, deprecations); keep the output to the tool's own."""
    for pattern in (".*[Aa]pex.*", ".*Transformer Engine.*", ".*transformer_engine.*",
                    ".*nvidia_resiliency.*", ".*deprecated.*", ".*torch.distributed.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def fail(message: str) -> int:
    """Print `error: <first line of message>` to stderr; returns the exit status 2."""
    return report(MarcoError(message))


def run_tool(main: Callable[[argparse.Namespace], Optional[int]], parser: argparse.ArgumentParser,
             argv=None, *, output: Optional[str] = None) -> int:
    """Parse `argv` with `parser` and run `main(args)`; returns the exit status (None = 0).

    A `MarcoError` is one `error:` line, status 2. `output` names the attribute of the output
    flag ("save", "out", "output_prefix"): an OSError (disk full, permissions) is then one line
    naming that flag, status 2; the tools write through `atomic_directory` or temporary names,
    so nothing is left half-written."""
    quiet_imports()
    args = parser.parse_args(argv)
    try:
        status = main(args)
    except MarcoError as e:
        return report(e)
    except OSError as e:
        if output is None:
            raise
        flag = "--" + output.replace("_", "-")
        return fail(f"writing {flag} {getattr(args, output)} failed, nothing written: {e}")
    return 0 if status is None else status


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help of every entry point and tool: an option's default is shown once. It is
    appended as "(default: X)" unless the help already says what the default is, or there
    is nothing to show (None: the help says what happens without the option; an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if ("default" in help.lower() or action.default in (None, False, argparse.SUPPRESS)
                or action.default == [] or not action.option_strings):
            return help
        return f"{help} (default: %(default)s)" if help else "(default: %(default)s)"


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """HelpFormatter keeping the description's line breaks (tools with a usage block)."""


def tool_parser(doc: str, *, show_defaults: bool = True) -> argparse.ArgumentParser:
    """The parser a tool starts from: the first paragraph of its docstring `doc` as the
    description; --help shows each default once (HelpFormatter), unless `show_defaults` is
    False."""
    formatter = HelpFormatter if show_defaults else argparse.HelpFormatter
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=formatter)


def hf_to_mcore_parser(doc: str, *, hf_dir: str, preset: str) -> argparse.ArgumentParser:
    """`tool_parser` with the flags of the tools that write a Megatron checkpoint from a Hugging
    Face directory (import, upcycling): --hf-dir (`hf_dir` names the model kind), --save and
    --preset (`preset`: its help); the tool adds its own."""
    p = tool_parser(doc)
    p.add_argument("--hf-dir", required=True, help=f"{hf_dir} directory (config.json + "
                   "model.safetensors, or shards with model.safetensors.index.json)")
    p.add_argument("--save", required=True, help="output checkpoint root")
    p.add_argument("--preset", help=preset)
    return p


# The expert modules an MoE can be built with (layer_spec.py), named once; `auto` and the
# fall-backs are layer_spec.resolve_expert_backend's, which every model builder calls.
EXPERT_BACKENDS = ("te", "torch-grouped", "sequential")
EXPERT_BACKEND_CHOICES = ("auto", *EXPERT_BACKENDS)


def add_expert_backend_flag(g, what: str = "") -> None:
    """--moe-expert-backend of the trainer and of every tool that builds a model."""
    g.add_argument("--moe-expert-backend", default="auto", choices=EXPERT_BACKEND_CHOICES,
                   help=f"{what}auto: TransformerEngine's grouped GEMM with TE on a GPU; else "
                        "torch._grouped_mm (torch-grouped), or SequentialMLP where it cannot run "
                        "(fp32 on a GPU, unaligned shapes). Checkpoints load into any")


def add_dtype_flag(p: argparse.ArgumentParser, help: str) -> None:
    """--dtype auto|fp32|bf16 of the checkpoint converters (read with `torch_dtype`)."""
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help=help)


def require_single_process(why: str = "the output loads at any parallel layout") -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(f"run as a single process (not under torchrun); {why}")


def require_empty_output(path: str, flag: str, overwrite: bool) -> None:
    """An output directory must be absent or empty, unless --overwrite."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise UsageError(f"{flag} {path} exists and is not empty; pass --overwrite to replace it")


def require_recorded_sha256(path: str, digest: Optional[str], remedy: str) -> None:
    """The tokenizer file a checkpoint records must still hash to the sha256 recorded with it
    (when one is: the trainer records it, the converters record directories): other bytes could
    give other token ids than those the model was trained on. `remedy`: what the user can do."""
    if digest and os.path.isfile(path):
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                raise UsageError(f"the checkpoint's tokenizer {path} changed since training "
                                 f"(sha256 differs); {remedy}")


def torch_dtype(choice: str, found):
    """--dtype auto|fp32|bf16 -> a torch dtype; auto keeps `found` if it is fp32 or bf16."""
    import torch

    dtype = found if choice == "auto" else getattr(torch, DTYPES[choice])
    return dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': the unit that keeps the number readable (no '0.0 GiB')."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ------------------------------------------------------------------------------------------
# All-or-nothing output directories
# ------------------------------------------------------------------------------------------
# `<target>.tmp-<tag>-<host>-<pid>` is being written; `<target>.old-<tag>-<host>-<pid>` is the
# previous output while the new one is renamed into place. The host keeps a run on another
# node of a shared file system from being taken for a dead local process. Names without a
# host (earlier versions) count as this host's.
_TEMP = re.compile(r"\.(tmp|old)-([A-Za-z0-9_]+)-(?:(.+)-)?(\d+)")
_HOST = socket.gethostname()


def _temp_path(target: str, kind: str, tag: str) -> str:
    return f"{target}.{kind}-{tag}-{_HOST}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(target: str) -> list[str]:
    """Clean what killed runs left next to `target`: the temporary directories of this host's
    processes that are no longer alive are removed; an old copy is put back as `target` when
    the run died between its two renames (target missing), else removed. Returns the names."""
    target = os.path.abspath(target)
    parent, base = os.path.split(target)
    if not os.path.isdir(parent):
        return []
    cleaned = []
    for name in sorted(os.listdir(parent)):
        match = _TEMP.fullmatch(name[len(base):]) if name.startswith(base + ".") else None
        if not match:
            continue
        kind, _, host, pid = match.groups()
        if (host or _HOST) != _HOST or _alive(int(pid)):
            continue
        path = os.path.join(parent, name)
        if kind == "old" and not os.path.exists(target):
            os.replace(path, target)
            what = f"restored {target} from {name}"
        else:
            shutil.rmtree(path, ignore_errors=True)
            what = f"removed {path}"
        print(f"{what} (left by process {pid}, which is no longer running)", file=sys.stderr,
              flush=True)
        cleaned.append(name)
    return cleaned


@contextlib.contextmanager
def atomic_directory(target: str, tag: str):
    """Yields a fresh sibling directory of `target` to write into. When the block succeeds it
    becomes `target` (replacing an old one); when it fails nothing is left behind: not the
    temporary, not the parent directories it needed, and an old `target` stays in place.
    Temporaries of killed runs are cleaned first (`remove_stale_temporaries`)."""
    target = os.path.abspath(target)
    remove_stale_temporaries(target)
    tmp, old = _temp_path(target, "tmp", tag), _temp_path(target, "old", tag)
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

    quiet_imports()
    setup_logging()
    try:
        return main(argv)
    except MarcoError as e:
        return report(e)
    finally:
        from megatron_ext import parallel  # imports Megatron-Core (seconds): tools start light

        parallel.shutdown()
