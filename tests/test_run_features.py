"""What a long run gives its user (issue: the cluster user's path): the run configuration
saved with every checkpoint and readable back, the log line's progress/tokens/ETA,
--async-save resuming exactly, the checkpoint retention rule, W&B offline files and the
torch profiler trace. In-process Trainer runs of tiny-dense on mock data (a few steps each,
gloo, torch_dist checkpoints)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import load_tool, signal_handlers_given_back

TINY = ["--preset", "tiny-dense", "--mock-data", "--micro-batch-size", "2", "--seq-length", "64",
        "--log-interval", "1", "--seed", "7"]


def _train(*args: str):
    """An in-process run of TINY + args: (its RunConfig, the losses per step)."""
    from megatron_ext import checkpointing
    from megatron_ext.arguments import parse_args
    from megatron_ext.trainer import Trainer

    cfg = parse_args([*TINY, *args])
    with signal_handlers_given_back():
        losses = Trainer(cfg).train()
    if cfg.checkpoint.save:
        checkpointing.release_save_directory(cfg.checkpoint.save)
    return cfg, losses


def _iterations(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.glob("iter_???????"))


def test_saved_run_config_reproduces_the_runs_runconfig(megatron_single_rank, tmp_path, capsys):
    from megatron_ext.config import RunConfig

    ckpt = tmp_path / "ckpt"
    cfg, _ = _train("--train-iters", "2", "--save", str(ckpt), "--lr", "1e-3",
                    "--lr-decay-style", "WSD", "--keep-last-checkpoints", "5")
    record = json.loads((ckpt / "iter_0000002" / "marco_run_config.json").read_text())
    assert RunConfig.from_json(record) == cfg
    # Readable back by a command, from the root or the iteration directory.
    tool = load_tool("show_run_config")
    capsys.readouterr()
    assert tool.main([str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"optim\.lr_decay_style\s+WSD", out)
    assert re.search(r"checkpoint\.keep_last\s+5", out)
    assert tool.main([str(ckpt / "iter_0000002"), "--json"]) == 0
    assert RunConfig.from_json(json.loads(capsys.readouterr().out)) == cfg


def test_show_run_config_names_a_checkpoint_without_one(tmp_path, capsys):
    (tmp_path / "iter_0000001").mkdir()
    (tmp_path / "iter_0000001" / "metadata.json").write_text("{}")
    assert load_tool("show_run_config").main([str(tmp_path / "iter_0000001")]) == 2
    assert "no marco_run_config.json" in capsys.readouterr().err


def test_async_save_resumes_exactly(megatron_single_rank, tmp_path):
    """4 steps straight == 2 steps saved asynchronously (--exit-interval) + 2 resumed from it;
    the async checkpoint is complete, 'latest' names it, and it records its configuration."""
    _, straight = _train("--train-iters", "4")
    ckpt = tmp_path / "ckpt"
    cfg, first = _train("--train-iters", "4", "--save", str(ckpt), "--save-interval", "1",
                        "--exit-interval", "2", "--async-save")
    assert cfg.checkpoint.async_save
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert _iterations(ckpt) == [1, 2] and not list(ckpt.glob("*.tmp"))
    assert (ckpt / "iter_0000002" / "marco_run_config.json").exists()
    _, rest = _train("--train-iters", "4", "--load", str(ckpt), "--save", str(ckpt),
                     "--async-save")
    assert first + rest == straight
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "4"


def test_retention_keeps_the_last_n_and_every_kth_after_ten_saves(megatron_single_rank, tmp_path):
    ckpt = tmp_path / "ckpt"
    _train("--train-iters", "10", "--save", str(ckpt), "--save-interval", "1",
           "--keep-last-checkpoints", "3", "--keep-checkpoint-every", "4", "--async-save")
    assert _iterations(ckpt) == [4, 8, 9, 10]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "10"


def test_keep_iterations_rule():
    from megatron_ext.checkpointing import keep_iterations

    its = list(range(1, 11))
    assert keep_iterations(its, None, None) == set(its)
    assert keep_iterations(its, 2, None) == {9, 10}
    assert keep_iterations(its, 1, 3) == {3, 6, 9, 10}


@pytest.mark.parametrize("flags, message", [
    (["--keep-last-checkpoints", "0"], "--keep-last-checkpoints must be >= 1"),
    (["--keep-checkpoint-every", "5"], "--keep-checkpoint-every needs --keep-last-checkpoints"),
    (["--profile"], "--profile writes its trace to --tensorboard-dir"),
    (["--profile", "--tensorboard-dir", "tb", "--profile-step-start", "3",
      "--profile-step-end", "3"], "--profile-step-start 3 must be >= 0 and below"),
])
def test_bad_new_flags_are_named(flags, message):
    from megatron_ext.arguments import parse_args
    from megatron_ext.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args([*TINY, *flags])


def test_wandb_offline_run_writes_its_files(megatron_single_rank, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _train("--train-iters", "3", "--wandb-project", "marco-test", "--wandb-exp-name", "tiny",
           "--wandb-save-dir", str(tmp_path / "wb"))
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = list(runs[0].glob("run-*.wandb"))
    assert data and data[0].stat().st_size > 0
    # The logged history holds the loss under its TensorBoard name.
    assert b"lm_loss" in data[0].read_bytes()


def test_profiler_trace_covers_the_requested_steps(megatron_single_rank, tmp_path):
    tb = tmp_path / "tb"
    _train("--train-iters", "5", "--tensorboard-dir", str(tb), "--profile",
           "--profile-step-start", "2", "--profile-step-end", "4")
    traces = list(tb.glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = {e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")}
    assert len(steps) == 2, steps  # iterations 2 and 3
    assert list(tb.glob("events.out.tfevents.*"))  # beside the scalars: one --logdir shows both


def test_log_line_shows_progress_tokens_and_eta():
    from megatron_ext.metrics import StepClock, format_log_line

    clock = StepClock(total_iters=10)
    assert clock.eta(1, 4.0) == pytest.approx(36.0)  # one step known: its time x 9 left
    scalars = {"lm_loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 1000.0,
               "tflops_per_device": 1.0, "mfu": 0.4, "peak_memory_gib": 1.0,
               "consumed_tokens": 3 * 2_097_152, "eta_sec": 3 * 86400 + 3661}
    line = format_log_line(3, scalars, total_iters=10)
    assert "step      3/10" in line
    assert "6.29M tokens" in line
    assert "ETA 3d 01:01:01" in line


def test_async_save_resumes_exactly_on_two_ranks(tmp_path):
    """The same under torchrun, EP 2 x DP 2 (gloo): the data-parallel ranks share the write
    (Megatron-Core's fully parallel save strategy) in their forked writers."""
    from conftest import run_pretrain

    def losses(log: Path) -> list[float]:
        return [r["lm_loss"] for r in map(json.loads, log.read_text().splitlines()) if "lm_loss" in r]

    common = ["--preset", "tiny", "--mock-data", "--micro-batch-size", "2", "--seq-length", "64",
              "--train-iters", "4", "--expert-model-parallel-size", "2", "--seed", "7"]
    straight = run_pretrain(*common, "--log-json", str(tmp_path / "straight.jsonl"), nproc=2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    ckpt = tmp_path / "ckpt"
    first = run_pretrain(*common, "--save", str(ckpt), "--save-interval", "2", "--exit-interval",
                         "2", "--async-save", "--log-json", str(tmp_path / "a.jsonl"), nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    rest = run_pretrain(*common, "--load", str(ckpt), "--save", str(ckpt), "--async-save",
                        "--log-json", str(tmp_path / "b.jsonl"), nproc=2)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert losses(tmp_path / "a.jsonl") + losses(tmp_path / "b.jsonl") == losses(tmp_path / "straight.jsonl")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "4"


def test_sft_and_opd_run_configurations_round_trip_through_json(monkeypatch):
    """What every post-training checkpoint saves: JSON-able, and read back equal (OPD's
    cascade, phases and teachers included)."""
    import importlib.util

    from conftest import REPO

    from megatron_ext.arguments import check_args
    from megatron_ext.config import RunConfig
    from megatron_ext.posttrain.opd import opd_data_options, opd_options, resolve_opd_args
    from megatron_ext.posttrain.sft_data import SFTDataOptions

    spec = importlib.util.spec_from_file_location("posttrain_marco", REPO / "posttrain_marco.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    monkeypatch.setenv("MARCO_OPD_TEACHER_A", "http://127.0.0.1:9")
    monkeypatch.setenv("MARCO_OPD_TEACHER_B", "http://127.0.0.1:10")
    opd_args = entry.build_parser().parse_args(
        ["opd", "--cascade", str(REPO / "configs/posttrain/tiny_cascade.yaml"), "--preset", "tiny"])
    opd = check_args(resolve_opd_args(opd_args), data_options=opd_data_options,
                     task_options=opd_options)
    sft = check_args(entry.build_parser().parse_args(["sft", "--preset", "tiny"]),
                     data_options=SFTDataOptions.from_args)
    for cfg in (opd, sft):
        assert RunConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert opd.task is not None and len(opd.task.cascade.phases) == 2
