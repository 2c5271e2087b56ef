"""Fault injection: each fault of docs/reliability.md, and what must survive it.

Most faults must be caught before step 1, so they run in this process against one tiny dense
run trained two steps (`base`): the entry point called in-process (`_entry`: its exit status
and its single `error:` line), `checkpointing` directly, or a `Trainer`. Where the model must
not even be built, building it fails the test. One pair of real runs in subprocesses covers
what needs a process to die or be signalled: kill -9 during a save (then: the lock is free, no
helper process is left, 'latest' names the last complete checkpoint) and a requeued run that
resumes it and gets SIGTERM mid-step (it saves and exits 0).
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import load_tool, signal_handlers_given_back, start_pretrain, wait_for
from helpers_hf import make_dense_qwen3

TINY = ["--preset", "tiny-dense", "--mock-data", "--micro-batch-size", "2", "--seq-length", "64",
        "--log-interval", "100", "--seed", "3"]
# A Hugging Face qwen3 with tiny-dense's architecture (vocabulary: the bundled tokenizer's).
TINY_DENSE_HF = dict(vocab_size=8192, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     max_position_embeddings=2048)
LATEST = "latest_checkpointed_iteration.txt"


def _log_here() -> None:
    """megatron_ext's log handler writes to the stdout of the test that set it up, closed by
    now under pytest's capture: point it at this test's."""
    for handler in logging.getLogger("megatron_ext").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.stream = sys.stdout


@pytest.fixture(autouse=True)
def _logs_to_this_test():
    _log_here()


def _entry(argv, monkeypatch, capsys, *, build_model: bool = True):
    """pretrain_marco.py's entry point, in this process: (exit status, `error:` lines, stdout).
    With build_model=False, building the model fails the test (the run had to stop before)."""
    import pretrain_marco
    from megatron_ext import cli, logs, parallel, trainer

    monkeypatch.setattr(parallel, "shutdown", lambda: None)  # keep this process's Megatron state
    if not build_model:
        def no_model(*args, **kwargs):
            raise AssertionError("the model was built; the run should have stopped before")
        builders = [n for n in ("build_stages", "build_stage") if hasattr(trainer, n)]
        assert builders, "megatron_ext.trainer builds its model with a function this test misses"
        for name in builders:
            monkeypatch.setattr(trainer, name, no_model)
    capsys.readouterr()
    logs.setup_logging()
    _log_here()
    with signal_handlers_given_back():
        status = cli.entry_point(pretrain_marco.main, argv)
    out = capsys.readouterr()
    return status, [line for line in out.err.splitlines() if line.startswith("error:")], out.out


def _inodes(root: Path) -> dict:
    """What a directory holds, to the file: name -> (inode, size), and 'latest'."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.name != ".marco_save.lock"}


@pytest.fixture(scope="module")
def base(megatron_single_rank, tmp_path_factory):
    """A 2-step tiny-dense run that saved iterations 1 and 2 (model + Adam state)."""
    from megatron_ext import checkpointing
    from megatron_ext.arguments import parse_args
    from megatron_ext.trainer import Trainer

    root = tmp_path_factory.mktemp("reliability")
    ckpt = root / "ckpt"
    _log_here()
    with signal_handlers_given_back():
        trainer = Trainer(parse_args([*TINY, "--train-iters", "2", "--save", str(ckpt),
                                      "--save-interval", "1"]))
        losses = trainer.train()
    checkpointing.release_save_directory(str(ckpt))
    assert len(losses) == 2 and (ckpt / LATEST).read_text() == "2"
    return SimpleNamespace(root=root, ckpt=ckpt, trainer=trainer, model=trainer.model)


def _mount_tmpfs(path: Path, size_mib: int, read_only: bool = False) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    options = f"size={size_mib}m" + (",ro" if read_only else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """make(size_mib) -> a fresh tmpfs of that size (root only: skipped elsewhere)."""
    mounted = []

    def make(size_mib: int) -> Path:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        if not _mount_tmpfs(path, size_mib):
            pytest.skip("needs root and mount(8) for a small tmpfs")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write: mode 555 for a user, a read-only tmpfs for root."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if not _mount_tmpfs(path, 1, read_only=True):
        pytest.skip("root writes anywhere, and no read-only tmpfs can be mounted here")
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _copy_latest(base, dest: Path) -> Path:
    """A checkpoint root holding a copy of base's iteration 2 only."""
    dest.mkdir()
    shutil.copytree(base.ckpt / "iter_0000002", dest / "iter_0000002")
    (dest / LATEST).write_text("2")
    return dest


# ------------------------------------------------------------------------------------------
# Corrupt or mismatched --load: one line naming the checkpoint, the file and what is wrong
# ------------------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


DAMAGE = {  # case: (damage to iter_0000002, what the line says, caught before the model exists)
    "truncated_distcp": (lambda it: _truncate(it / "__0_0.distcp"),
                         "__0_0.distcp is truncated: ", True),
    "missing_distcp": (lambda it: os.remove(it / "__0_1.distcp"), "__0_1.distcp is missing", True),
    "missing_metadata": (lambda it: os.remove(it / ".metadata"), ".metadata is missing", True),
    "truncated_metadata": (lambda it: _truncate(it / ".metadata"), ".metadata is truncated", True),
    "missing_common": (lambda it: os.remove(it / "common.pt"), "common.pt is missing", True),
    "garbled_metadata_json": (lambda it: (it / "metadata.json").write_text("{not json"),
                              "metadata.json is unreadable", True),
    "truncated_common": (lambda it: _truncate(it / "common.pt"), "common.pt is unreadable", False),
    # The right length, zeros inside: only reading the tensors can tell.
    "garbled_distcp": (lambda it: (it / "__0_0.distcp").write_bytes(
        b"\0" * (it / "__0_0.distcp").stat().st_size), "is corrupt", False),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_checkpoint_is_one_line_naming_the_file(base, tmp_path, monkeypatch, capsys, case):
    from megatron_ext import checkpointing
    from megatron_ext.errors import CheckpointError

    damage, named, before_model = DAMAGE[case]
    root = _copy_latest(base, tmp_path / "ckpt")
    damage(root / "iter_0000002")
    status, errors, _ = _entry([*TINY, "--train-iters", "3", "--load", str(root)], monkeypatch,
                               capsys, build_model=not before_model)
    assert status == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: --load {root / 'iter_0000002'}: "), errors
    assert named in errors[0], errors
    # The library call the tools use says the same (torch's CheckpointException included).
    with pytest.raises(CheckpointError) as caught:
        checkpointing.load_checkpoint(str(root), base.model, load_rng=False)
    assert named in str(caught.value) and "\n" not in str(caught.value)


def test_checkpoint_of_another_architecture_is_refused_before_the_model_is_built(
        base, monkeypatch, capsys):
    # A tiny-dense checkpoint loaded with --preset tiny: a 47-line KeyError before.
    status, errors, _ = _entry(["--preset", "tiny", *TINY[2:], "--train-iters", "3",
                                "--load", str(base.ckpt)], monkeypatch, capsys, build_model=False)
    assert status == 2 and errors == [
        f"error: --load {base.ckpt / 'iter_0000002'}: the checkpoint's model has num_experts = "
        "None (marco_model.json: 'tiny-dense') but this run's has num_experts = 16 (--preset "
        "tiny); use --preset tiny-dense"]
    status, errors, _ = _entry([*TINY, "--num-layers", "2", "--train-iters", "3",
                                "--load", str(base.ckpt)], monkeypatch, capsys, build_model=False)
    assert status == 2 and len(errors) == 1
    assert "num_layers = 4 (marco_model.json: 'tiny-dense') but this run's has num_layers = 2 " \
           "(--num-layers)" in errors[0], errors


# ------------------------------------------------------------------------------------------
# Non-finite numbers, and a checkpoint at or past --train-iters
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--clip-grad", "inf")])
def test_non_finite_flag_is_refused_naming_it(base, monkeypatch, capsys, flag, value):
    status, errors, _ = _entry([*TINY, flag, value], monkeypatch, capsys, build_model=False)
    assert status == 2 and errors == [f"error: {flag} {value}: must be a finite number"]


def test_nan_in_the_weights_stops_at_step_1_and_saves_nothing(base, tmp_path, monkeypatch, capsys):
    importer = load_tool("import_hf_to_mcore")
    src, ckpt, save = tmp_path / "hf", tmp_path / "imported", tmp_path / "save"
    hf = make_dense_qwen3(str(src), seed=5, **TINY_DENSE_HF)
    with torch.no_grad():
        hf.model.embed_tokens.weight[7, 3] = float("nan")  # one NaN; the output layer is tied
    hf.save_pretrained(str(src))
    assert importer.main(["--hf-dir", str(src), "--save", str(ckpt)]) == 0
    status, errors, _ = _entry([*TINY, "--train-iters", "3", "--load", str(ckpt), "--save",
                                str(save), "--save-interval", "1"], monkeypatch, capsys)
    assert status == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: step 1: lm loss is nan; stopping without saving"), errors
    assert [p.name for p in save.iterdir()] == [".marco_save.lock"]  # no checkpoint, no temporary


def test_non_finite_weights_are_never_saved(base):
    from megatron_ext.errors import TrainingError

    param = next(base.model[0].parameters())
    before = _inodes(base.ckpt)
    kept = param.detach().clone()
    with torch.no_grad():
        param.view(-1)[0] = float("inf")
    try:
        with pytest.raises(TrainingError, match=r"iteration 2: the model weights are not finite "
                                                r"\(NaN/inf\); not saving to --save"):
            base.trainer.save()
    finally:
        with torch.no_grad():
            param.copy_(kept)
    assert _inodes(base.ckpt) == before


def test_checkpoint_past_train_iters_is_an_error_and_at_it_a_warning(base, monkeypatch, capsys):
    status, errors, _ = _entry([*TINY, "--train-iters", "1", "--lr-decay-iters", "2",
                                "--load", str(base.ckpt)], monkeypatch, capsys)
    assert status == 2 and errors == [
        f"error: --load {base.ckpt}: the checkpoint is at iteration 2, past --train-iters 1; "
        "raise --train-iters to continue training"]
    before = _inodes(base.ckpt)
    status, errors, out = _entry([*TINY, "--train-iters", "2", "--load", str(base.ckpt),
                                  "--save", str(base.ckpt)], monkeypatch, capsys)
    assert status == 0 and errors == []
    assert "nothing to train: the checkpoint is at iteration 2 = --train-iters 2" in out, out
    assert _inodes(base.ckpt) == before  # nothing saved again


# ------------------------------------------------------------------------------------------
# The --save directory
# ------------------------------------------------------------------------------------------
def test_a_fresh_run_refuses_a_directory_holding_checkpoints(base, tmp_path, monkeypatch, capsys):
    before = _inodes(base.ckpt)
    for load in ([], ["--load", str(_copy_latest(base, tmp_path / "elsewhere"))]):
        status, errors, _ = _entry([*TINY, "--train-iters", "3", "--save", str(base.ckpt), *load],
                                   monkeypatch, capsys, build_model=False)
        assert status == 2 and len(errors) == 1, errors
        assert errors[0].startswith(
            f"error: --save {base.ckpt} already holds checkpoints (latest iteration 2) that this "
            "run does not resume"), errors
        assert "--overwrite-save" in errors[0]
    assert _inodes(base.ckpt) == before


def test_save_directory_rules(base, tmp_path):
    """Resume, requeue, stage chain, a rewind, the same iteration saved again, another run's
    checkpoint, 'latest' never backwards, --overwrite-save, cleaning after a killed save."""
    from megatron_ext import checkpointing as ck
    from megatron_ext.errors import CheckpointError

    root = tmp_path / "ckpt"
    shutil.copytree(base.ckpt, root)
    state = ck.TrainState

    def claim(**kw):
        try:
            return ck.claim_save_directory(str(root), **kw)
        finally:
            ck.release_save_directory(str(root))

    # Resuming (or a Slurm requeue: --load = --save) may save iteration 2 again.
    d = claim(load=str(root))
    assert d.resumed_from == 2 and d.locked
    old = (root / "iter_0000002" / "__0_0.distcp").stat().st_ino
    ck.save_checkpoint(str(root), state(iteration=2), base.model, directory=d)
    assert (root / "iter_0000002" / "__0_0.distcp").stat().st_ino != old
    assert (root / LATEST).read_text() == "2" and not list(root.glob("*.old-*"))
    # A stage chain: --load the previous stage, --save an empty directory.
    assert ck.claim_save_directory(str(tmp_path / "stage2"), load=str(root)).resumed_from is None
    ck.release_save_directory(str(tmp_path / "stage2"))
    # A rewind (--load iteration 1 of a directory at 2) and a fine-tune from it need the flag.
    with pytest.raises(CheckpointError, match=r"--load starts from iteration 1 of --save .* "
                                              r"\(latest iteration 2\).*--overwrite-save"):
        claim(load=str(root / "iter_0000001"))
    # A fine-tune whose --save is the directory --load reads: no advice to "resume with --load"
    # the directory it already loads (issue 29).
    with pytest.raises(CheckpointError, match=rf"^--save {root} holds the checkpoints --load {root} "
                                              r"reads \(latest iteration 2\); this run starts a "
                                              r"new run from their weights, so save to another "
                                              r"directory, or pass --overwrite-save") as e:
        claim(load=str(root), finetune=True)
    assert "resume with" not in str(e.value)
    with pytest.raises(CheckpointError, match="already holds checkpoints .* resume with --load"):
        claim(load=str(tmp_path / "stage2"), finetune=True)  # another run's: resuming is advice

    # Without a claim, a save never replaces another run's checkpoint nor moves 'latest' back.
    before = _inodes(root)
    with pytest.raises(CheckpointError, match=r"its latest checkpoint is iteration 2; not "
                                              r"saving iteration 1, which would move"):
        ck.save_checkpoint(str(root), state(iteration=1), base.model)
    ck._UNCLAIMED.clear()  # as a new process would be
    with pytest.raises(CheckpointError, match=r"iter_0000002 is a checkpoint of another run; "
                                              r"not replacing it"):
        ck.save_checkpoint(str(root), state(iteration=2), base.model)
    assert _inodes(root) == before

    # A killed save's leftovers are cleaned under the lock; a checkpoint moved aside while it
    # was being replaced is put back.
    os.rename(root / "iter_0000002", root / "iter_0000002.old-99999")
    (root / "iter_0000003.tmp").mkdir()
    claim(load=str(root / "iter_0000001"), overwrite=True)
    assert (root / "iter_0000002" / "metadata.json").exists()
    assert not (root / "iter_0000003.tmp").exists() and not list(root.glob("*.old-*"))

    # --overwrite-save: another run's checkpoints stay until this run's first save is complete.
    d = claim(overwrite=True)
    assert d.stale == [1, 2] and _inodes(root) == before
    ck.save_checkpoint(str(root), state(iteration=1), base.model, directory=d)
    assert sorted(p.name for p in root.iterdir() if p.name != ".marco_save.lock") == [
        "iter_0000001", LATEST]
    assert (root / LATEST).read_text() == "1"
    assert ck.load_checkpoint(str(root), base.model, load_rng=False).state.iteration == 1


def test_read_only_save_directory_is_refused_before_step_1(base, read_only_dir, monkeypatch,
                                                           capsys):
    for save, says in ((read_only_dir, "is not writable"),
                       (read_only_dir / "ckpt", "cannot create the directory")):
        status, errors, _ = _entry([*TINY, "--train-iters", "3", "--save", str(save)],
                                   monkeypatch, capsys, build_model=False)
        assert status == 2 and len(errors) == 1 and errors[0].startswith(f"error: --save {save}"), \
            errors
        assert says in errors[0] and ("Read-only file system" in errors[0]
                                      or "Permission denied" in errors[0]), errors


def _too_small(save: Path, errors: list[str]) -> None:
    from megatron_ext.cli import human_bytes
    from megatron_ext.flops import checkpoint_bytes
    from megatron_ext.presets import get_preset

    needed, how = checkpoint_bytes(get_preset("tiny-dense"), torch.float32)  # measured below
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"error: --save {save}: "), errors
    assert f" free on its file system, but one checkpoint needs about {human_bytes(needed)} " \
           f"({how}); free some space" in errors[0], errors
    assert not save.exists()  # the directory the check created is gone again


def test_too_small_file_system_is_refused_before_step_1(base, tmp_path, monkeypatch, capsys):
    usage = shutil.disk_usage(tmp_path)
    fake = namedtuple("usage", "total used free")(usage.total, usage.total - 2 ** 20, 2 ** 20)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: fake)
    save = tmp_path / "ckpt"
    status, errors, _ = _entry([*TINY, "--train-iters", "3", "--save", str(save)], monkeypatch,
                               capsys, build_model=False)
    assert status == 2
    _too_small(save, errors)
    assert "1.0 MiB free" in errors[0]


def test_too_small_tmpfs_is_refused_before_step_1(base, tmpfs, monkeypatch, capsys):
    save = tmpfs(4) / "ckpt"
    status, errors, _ = _entry([*TINY, "--train-iters", "3", "--save", str(save)], monkeypatch,
                               capsys, build_model=False)
    assert status == 2
    _too_small(save, errors)


def test_disk_full_during_a_save_leaves_nothing_and_stops(base, tmpfs, monkeypatch, capsys):
    # Room for one checkpoint (25.3 MiB) but not two: the second save runs out of space.
    save = tmpfs(40) / "ckpt"
    status, errors, _ = _entry([*TINY, "--train-iters", "3", "--save", str(save),
                                "--save-interval", "1"], monkeypatch, capsys)
    assert status == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: --save {save}: saving iteration 2 failed ("), errors
    assert "; the file system is full (" in errors[0], errors
    assert errors[0].endswith(f"nothing written, {LATEST} still names iteration 1"), errors
    assert sorted(p.name for p in save.iterdir()) == [".marco_save.lock", "iter_0000001", LATEST]
    assert (save / LATEST).read_text() == "1"


def test_failed_save_removes_its_temporary_and_a_later_save_succeeds(base, tmp_path):
    """A write that fails (here: RLIMIT_FSIZE, on any machine) inside the writer processes."""
    from megatron_ext import checkpointing as ck
    from megatron_ext.errors import CheckpointError

    root = tmp_path / "ckpt"
    ck.save_checkpoint(str(root), ck.TrainState(iteration=1), base.model)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, limits[1]))
    try:
        with pytest.raises(CheckpointError) as caught:
            ck.save_checkpoint(str(root), ck.TrainState(iteration=2), base.model)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert str(caught.value).startswith(f"--save {root}: saving iteration 2 failed (a file write "
                                        "was cut short: "), caught.value
    assert str(caught.value).endswith(f"nothing written, {LATEST} still names iteration 1")
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000001", LATEST]
    ck.save_checkpoint(str(root), ck.TrainState(iteration=2), base.model)
    assert (root / LATEST).read_text() == "2"


def test_checkpoint_size_estimate_matches_real_saves(base, tmp_path):
    from megatron_ext import checkpointing as ck
    from megatron_ext.arguments import parse_args
    from megatron_ext.flops import checkpoint_bytes
    from megatron_ext.presets import get_preset
    from megatron_ext.trainer import Trainer

    def size(it: Path) -> int:
        return sum(p.stat().st_size for p in it.iterdir())

    dense = get_preset("tiny-dense")
    fp32, how = checkpoint_bytes(dense, torch.float32)
    assert how == "2.0M parameters x 12 bytes: 4-byte weights + Adam's 2 fp32 moments"
    assert 1.0 <= fp32 / size(base.ckpt / "iter_0000002") < 1.1
    with signal_handlers_given_back():
        bf16 = Trainer(parse_args([*TINY, "--bf16", "--train-iters", "1"]))
        bf16.train()  # Adam's moments exist from the first step on
    ck.save_checkpoint(str(tmp_path / "bf16"), ck.TrainState(), bf16.model, bf16.optimizer,
                       bf16.scheduler)
    estimate, how = checkpoint_bytes(dense, torch.bfloat16)
    assert how.endswith("x 14 bytes: 2-byte weights + fp32 main weights + Adam's 2 fp32 moments")
    assert 1.0 <= estimate / size(tmp_path / "bf16" / "iter_0000000") < 1.1


# ------------------------------------------------------------------------------------------
# Real processes: kill -9 during a save, a second run on the same directory, SIGTERM mid-step
# ------------------------------------------------------------------------------------------
def _session(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`: the run and everything it started."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        state, _, _, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            alive.append(int(pid))
    return alive


def _no_process_left(sid: int, timeout: float = 30) -> bool:
    """Every process of the run's process group (setsid) ends; its checkpoint writer exits a
    moment after its parent."""
    deadline = time.time() + timeout
    while _session(sid) and time.time() < deadline:
        time.sleep(0.1)
    return _session(sid) == []


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc")
def test_kill_9_during_a_save_then_a_requeued_run_signalled_mid_step(megatron_single_rank,
                                                                    tmp_path):
    from megatron_ext import checkpointing as ck
    from megatron_ext.errors import CheckpointError

    root, log = tmp_path / "ckpt", tmp_path / "resumed.jsonl"
    proc = start_pretrain([*TINY, "--train-iters", "1000", "--save", str(root), "--save-interval", "2"],
                          OMP_NUM_THREADS="1")
    try:
        assert wait_for(lambda: (root / LATEST).exists(), proc), proc.communicate()[1][-3000:]
        # A second run on the same directory, while the first runs: refused, naming the holder.
        with pytest.raises(CheckpointError, match=rf"--save {root} is in use by another run "
                                                  rf"\(host \S+, PID {proc.pid}, since "):
            ck.claim_save_directory(str(root), load=str(root))
        # kill -9 while a later checkpoint is being written (its writer processes are running).
        assert wait_for(lambda: any(root.glob("iter_*.tmp")), proc, poll=0.01)  # a save: >0.2 s
        proc.send_signal(signal.SIGKILL)
        writing = next(root.glob("iter_*.tmp")).name[:-4]
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # The writer helper, its forked workers and the resource tracker die with the trainer.
    assert _no_process_left(proc.pid), "helper processes outlived the killed trainer"
    latest = int((root / LATEST).read_text())
    assert not (root / writing).exists() and latest == int(writing[5:]) - 2

    # The lock died with the run; a requeued run (--load = --save) resumes, cleans the killed
    # save's temporary, and on SIGTERM mid-step finishes the step, saves and exits 0.
    proc = start_pretrain([*TINY, "--train-iters", "1000", "--load", str(root), "--save", str(root),
                   "--log-json", str(log)])
    assert wait_for(lambda: log.exists() and log.read_text().count("lm_loss") >= 1, proc), \
        proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"resumed from {root / f'iter_{latest:07d}'} at iteration {latest}" in out
    saved = int((root / LATEST).read_text())
    assert saved > latest and (root / f"iter_{saved:07d}" / "metadata.json").exists()
    assert not list(root.glob("iter_*.tmp")) and _no_process_left(proc.pid)
