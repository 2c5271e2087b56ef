"""megatron_ext/cli.py: the all-or-nothing output directory every tool writes through (and
the temporaries of killed runs it cleans), and `run_tool`, the one error tail of every tool."""

import argparse
import os
import socket
import subprocess
import sys

import pytest

from megatron_ext.cli import (
    UsageError,
    atomic_directory,
    human_bytes,
    require_empty_output,
    run_tool,
)
from megatron_ext.errors import ConfigError


def test_success_replaces_the_old_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(str(target), "t") as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        assert os.path.basename(tmp) == f"out.tmp-t-{socket.gethostname()}-{os.getpid()}"
        assert os.listdir(target) == ["old.txt"]  # untouched while the new one is written
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert sorted(os.listdir(target)) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or old copy left


def test_failure_keeps_the_old_directory_and_removes_created_parents(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(str(target), "t") as tmp:
            open(os.path.join(tmp, "half.txt"), "w").write("half")
            raise RuntimeError("disk full")
    assert os.listdir(target) == ["old.txt"] and os.listdir(tmp_path) == ["out"]

    deep = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(str(deep), "t"):
            assert (tmp_path / "a" / "b").is_dir()
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == ["out"]


def test_output_must_be_empty_unless_overwrite(tmp_path):
    (tmp_path / "x").write_text("x")
    with pytest.raises(UsageError, match=r"^--save .* exists and is not empty; pass --overwrite"):
        require_empty_output(str(tmp_path), "--save", overwrite=False)
    require_empty_output(str(tmp_path), "--save", overwrite=True)
    with pytest.raises(UsageError, match=r"^--out .*/x exists and is not a directory"):
        require_empty_output(str(tmp_path / "x"), "--out", overwrite=True)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_of_killed_runs_are_cleaned(tmp_path, capsys):
    """A run killed while writing leaves `<target>.tmp-<tag>-<host>-<pid>` (15 GiB for an
    upcycled Nano); the next write to that target removes those of dead local processes."""
    host, dead, alive = socket.gethostname(), _dead_pid(), os.getppid()
    names = {
        f"out.tmp-upcycle-{host}-{dead}": False,    # killed run: removed
        f"out.tmp-upcycle-{dead}": False,           # the same, named by an earlier version
        f"out.tmp-export-{host}-{alive}": True,     # a run still writing: kept
        f"out.tmp-upcycle-otherhost-{dead}": True,  # another node's run (shared file system)
        f"other.tmp-upcycle-{host}-{dead}": True,   # another target's
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard").write_bytes(b"x" * 1000)
    with atomic_directory(str(tmp_path / "out"), "t") as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    kept = {n for n, keep in names.items() if keep}
    assert set(os.listdir(tmp_path)) == kept | {"out"}
    err = capsys.readouterr().err
    assert err.count("which is no longer running") == 2 and f"left by process {dead}" in err

    # Killed between its two renames: the old output waits as .old-...; with the target gone
    # it is put back (and so survives a failing write), never deleted.
    target = tmp_path / "res"
    (tmp_path / f"res.old-import-{host}-{dead}").mkdir()
    (tmp_path / f"res.old-import-{host}-{dead}" / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(str(target), "t"):
            raise RuntimeError("interrupted")
    assert (target / "weights").read_text() == "old"
    assert not (tmp_path / f"res.old-import-{host}-{dead}").exists()


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 2**20, 3.5 * 2**30, 2**41)] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 MiB", "3.5 GiB", "2.0 TiB"]


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--fail", choices=["config", "disk", "bug"])
    return p


def _tool(args):
    if args.fail == "config":
        raise ConfigError("--preset: unknown preset 'x'\nsecond line")
    if args.fail == "disk":
        raise OSError(28, "No space left on device")
    if args.fail == "bug":
        raise KeyError("a bug keeps its traceback")
    return 3


def test_run_tool_error_tail(capsys):
    assert run_tool(_tool, _parser(), ["--out", "o"], output="out") == 3
    assert run_tool(_tool, _parser(), ["--fail", "config"], output="out") == 2
    assert capsys.readouterr().err == "error: --preset: unknown preset 'x'\n"
    assert run_tool(_tool, _parser(), ["--out", "d/x", "--fail", "disk"], output="out") == 2
    assert capsys.readouterr().err == ("error: writing --out d/x failed, nothing written: "
                                       "[Errno 28] No space left on device\n")
    with pytest.raises(OSError):  # no output flag named: not a write error, a traceback
        run_tool(_tool, _parser(), ["--fail", "disk"])
    with pytest.raises(KeyError):
        run_tool(_tool, _parser(), ["--fail", "bug"], output="out")
