"""Flags -> the frozen RunConfig: Megatron-LM's meanings and defaults, checks that name the flag,
and resuming with other schedule flags (an error naming both values unless told which wins)."""

import dataclasses
import json

import pytest
import torch
from conftest import run_pretrain

from megatron_ext.arguments import parse_args
from megatron_ext.errors import ConfigError, LayoutError, MarcoError


@pytest.fixture
def world(monkeypatch):
    def set_world(n: int):
        monkeypatch.setenv("WORLD_SIZE", str(n))

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return set_world


def test_run_config_is_frozen_and_resolves_every_default(world):
    cfg = parse_args(["--preset", "tiny", "--train-iters", "50"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch.train_iters = 3  # type: ignore[misc]
    assert cfg.batch.global_batch_size == cfg.batch.micro_batch_size == 4  # x DP 1
    assert cfg.batch.seq_length == 256  # the preset's
    assert cfg.optim.lr_decay_iters == 50 and cfg.optim.lr_warmup_iters == 5
    assert cfg.model_options.params_dtype == torch.float32  # CPU default
    assert cfg.model_options.moe.token_dispatcher == "allgather"  # EP = 1
    assert cfg.optim.use_distributed_optimizer is False  # CPU default


def test_expert_tensor_parallel_size_defaults_to_tensor_parallel_size(world):
    world(4)
    cfg = parse_args(["--preset", "tiny", "--tensor-model-parallel-size", "2"])
    assert cfg.layout.expert_tensor == 2 and cfg.layout.sequence_parallel  # MoE with TP > 1
    assert cfg.data_parallel_size == 2
    cfg = parse_args(["--preset", "tiny", "--tensor-model-parallel-size", "2",
                      "--expert-tensor-parallel-size", "1", "--expert-model-parallel-size", "2"])
    assert cfg.layout.expert_tensor == 1 and cfg.model_options.moe.token_dispatcher == "alltoall"


def test_bf16_is_allowed_on_cpu(world):
    assert parse_args(["--bf16"]).model_options.params_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="--bf16 and --fp32 are exclusive"):
        parse_args(["--bf16", "--fp32"])


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--min-lr", "nan"], "--min-lr nan: must be a finite number"),
    (["--clip-grad", "inf"], "--clip-grad inf: must be a finite number"),
    (["--moe-aux-loss-coeff", "nan"], "--moe-aux-loss-coeff nan: must be a finite number"),
    (["--lr", "-1"], "--lr -1.0 must be >= 0"),
    (["--adam-beta2", "1"], "--adam-beta2 1.0 must be in [0, 1)"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
    (["--save-interval", "0", "--save", "x"], "--save-interval must be >= 1"),
    (["--lr-warmup-iters", "100", "--train-iters", "100"], "--lr-warmup-iters 100 must be below"),
    (["--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"], "exclusive"),
    (["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"], "exclusive"),  # Megatron-LM
    (["--preset", "tiny-dense", "--num-experts", "4"], "preset 'tiny-dense' is dense"),
])
def test_bad_flags_are_named(world, argv, message):
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    assert message in str(info.value)


def test_global_batch_must_split_over_data_parallel_ranks(world):
    world(2)
    with pytest.raises(LayoutError, match="--global-batch-size 6 is not divisible by "
                                          "--micro-batch-size 4 x data-parallel size 2"):
        parse_args(["--global-batch-size", "6"])


def test_every_user_error_has_one_root():
    from megatron_ext import errors

    user_errors = [v for v in vars(errors).values()
                   if isinstance(v, type) and issubclass(v, Exception) and v is not MarcoError]
    assert len(user_errors) >= 7 and all(issubclass(e, MarcoError) for e in user_errors)
    from megatron_ext.presets import get_preset

    with pytest.raises(ConfigError, match="--preset: unknown preset 'giant'"):
        get_preset("giant")


# ---------------------------------------------------------------------- resuming a schedule
SCHED = ["--preset", "tiny", "--mock-data", "--micro-batch-size", "2", "--seq-length", "64",
         "--seed", "5", "--log-interval", "100"]


def _lrs(path) -> dict:
    return {r["step"]: r["lr"] for r in map(json.loads, open(path)) if "lr" in r}


@pytest.mark.slow
def test_resume_with_other_schedule_flags_is_an_error_unless_told_which_wins(tmp_path):
    ckpt = tmp_path / "ckpt"
    first = run_pretrain(*SCHED, "--train-iters", "4", "--save", str(ckpt))
    assert first.returncode == 0, first.stderr[-3000:]

    refused = run_pretrain(*SCHED, "--train-iters", "8", "--load", str(ckpt))
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, refused.stderr[-3000:]
    # --train-iters 8 moves the default decay horizon (--lr-decay-iters): both values named.
    assert "--lr-decay-iters 8 differs from the checkpoint's 4" in errors[0], errors[0]
    assert "--override-opt-param-scheduler" in errors[0]
    assert " lm loss " not in refused.stdout

    straight = run_pretrain(*SCHED, "--train-iters", "8", "--log-json", str(tmp_path / "s.jsonl"))
    taken = run_pretrain(*SCHED, "--train-iters", "8", "--load", str(ckpt),
                         "--override-opt-param-scheduler", "--log-json", str(tmp_path / "o.jsonl"))
    kept = run_pretrain(*SCHED, "--train-iters", "8", "--load", str(ckpt),
                        "--use-checkpoint-opt-param-scheduler", "--log-json", str(tmp_path / "k.jsonl"))
    for r in (straight, taken, kept):
        assert r.returncode == 0, r.stderr[-3000:]
    s, o, k = (_lrs(tmp_path / f"{n}.jsonl") for n in "sok")
    assert sorted(o) == sorted(k) == [5, 6, 7, 8]
    # The flags' schedule (decay over 8 steps) from step 5 on, exactly as a straight 8-step run;
    # the checkpoint's (decay over 4 steps, then --min-lr) when it is kept.
    assert [o[i] for i in range(5, 9)] == pytest.approx([s[i] for i in range(5, 9)], rel=1e-9)
    assert [k[i] for i in range(5, 9)] == pytest.approx([3e-4] * 4, rel=1e-9)
