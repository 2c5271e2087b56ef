"""megatron_ext/cli.py: the all-or-nothing output directory every tool writes through."""

import os

import pytest

from megatron_ext.cli import UsageError, atomic_directory, require_empty_output


def test_success_replaces_the_old_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(str(target), "t") as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith("out.tmp-t-")
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
