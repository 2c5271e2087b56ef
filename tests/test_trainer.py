"""The trainer end to end on CPU, as users run it: pretrain_marco.py in a subprocess.

Exact resume is checked here across a curriculum stage switch (the harder case of a plain
resume); kill -9 during a save and SIGTERM mid-step are test_reliability.py's real-process pair,
USR1 under Slurm is test_slurm.py's and test_slurm_real.py's."""

import json
from pathlib import Path

import pytest
from conftest import run_pretrain

TINY = ["--preset", "tiny", "--micro-batch-size", "4", "--seed", "7"]


def _json_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train_records(path: Path) -> list[dict]:
    return [r for r in _json_log(path) if "lm_loss" in r]


def _tensorboard_scalars(logdir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_loss_falls_on_real_text_and_everything_is_logged(tmp_path):
    tb, log = tmp_path / "tb", tmp_path / "log.jsonl"
    result = run_pretrain(
        *TINY, "--train-iters", "50", "--lr", "3e-3", "--log-interval", "10",
        "--tensorboard-dir", str(tb), "--log-json", str(log), "--eval-interval", "50",
        "--eval-iters", "1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = _train_records(log)
    assert [r["step"] for r in records] == list(range(1, 51))
    losses = [r["lm_loss"] for r in records]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)  # ln(8192) = 9.0 at the start
    for key in ("step", "lm_loss", "load_balancing_loss", "lr", "grad_norm", "tokens_per_sec"):
        assert all(key in r for r in records), key
    # A readable line every --log-interval steps.
    assert sum(" lm loss " in line for line in result.stdout.splitlines()) >= 5

    scalars = _tensorboard_scalars(tb)
    for tag in ("lm_loss", "lr", "grad_norm", "load_balancing_loss", "z_loss", "tokens_per_sec",
                "tflops_per_device", "mfu", "peak_memory_gib"):
        assert len(scalars[tag]) == 50, tag
    for layer in range(4):
        imbalance = scalars[f"moe/expert_load_imbalance/layer_{layer:02d}"]
        assert len(imbalance) == 50 and all(v >= 1.0 for v in imbalance)
    assert scalars["lm_loss"] == pytest.approx(losses, rel=1e-6)

    # Evaluation: loss per language, expert load per layer, the language correlation heatmap.
    for lang in ("en", "de", "zh", "ru"):
        assert len(scalars[f"validation/lm_loss/{lang}"]) == 1
    assert len(scalars["validation/expert_load_imbalance/layer_03"]) == 1
    assert " validation lm loss " in result.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = EventAccumulator(str(tb), size_guidance={"images": 0})
    images.Reload()
    [heatmap] = images.Images("routing/language_correlation")
    assert heatmap.step == 50 and heatmap.width > 100 and heatmap.height > 100


def test_corrupt_checkpoint_is_refused_before_training(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000005").mkdir(parents=True)
    (ckpt / "iter_0000005" / "metadata.json").write_text("{not json")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("5")
    result = run_pretrain(*TINY, "--mock-data", "--train-iters", "2", "--load", str(ckpt))
    assert result.returncode == 2
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and str(ckpt / "iter_0000005") in errors[0], result.stderr[-2000:]
    assert " lm loss " not in result.stdout


@pytest.mark.slow
def test_torchrun_data_parallel_two_ranks(tmp_path):
    log = tmp_path / "log.jsonl"
    result = run_pretrain(*TINY, "--train-iters", "4", "--global-batch-size", "8",
                          "--log-json", str(log), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DP 2" in result.stdout
    records = _train_records(log)
    assert [r["step"] for r in records] == [1, 2, 3, 4]


CURRICULUM = """
data_root: "@sample"
sources:
  en: {prefix: en_train_text_document, lang: en}
  zh: {prefix: zh_train_text_document, lang: zh}
  de: {prefix: de_train_text_document, lang: de}
stages:
  - {name: one, end: 3072, languages: [en, zh], blend: {en: 3, zh: 1}}
  - {name: two, end: 6144, languages: [en, zh, de], blend: {en: 1, zh: 1, de: 2}}
  - {name: three, end: 8192, languages: [de], blend: {de: 1}}
"""


@pytest.mark.slow
def test_curriculum_switches_at_the_boundary_and_resumes_exactly_across_it(tmp_path):
    curriculum = tmp_path / "curriculum.yaml"
    curriculum.write_text(CURRICULUM)
    # 4 x 256 = 1024 tokens per step: stages cover steps 1-3, 4-6, 7-8.
    common = [*TINY, "--curriculum", str(curriculum), "--train-iters", "8",
              "--lr-warmup-iters", "1", "--log-interval", "100"]
    straight = run_pretrain(*common, "--log-json", str(tmp_path / "straight.jsonl"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    records = _train_records(tmp_path / "straight.jsonl")
    assert [r["curriculum_stage"] for r in records] == [0, 0, 0, 1, 1, 1, 2, 2]
    consumed = [{k.rsplit("/", 1)[1]: v for k, v in r.items() if k.startswith("data/consumed_tokens/")}
                for r in records]
    assert consumed[-1]["de"] > consumed[5]["de"] > consumed[2].get("de", 0) == 0

    ckpt = tmp_path / "ckpt"
    first = run_pretrain(*common, "--save", str(ckpt), "--exit-interval", "5",
                         "--log-json", str(tmp_path / "first.jsonl"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "5"
    second = run_pretrain(*common, "--load", str(ckpt), "--log-json", str(tmp_path / "second.jsonl"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert [r["step"] for r in _train_records(tmp_path / "second.jsonl")] == [6, 7, 8]
    resumed = _train_records(tmp_path / "first.jsonl") + _train_records(tmp_path / "second.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["lm_loss"] for r in resumed] == pytest.approx([r["lm_loss"] for r in records], rel=1e-6)
    assert [r["curriculum_stage"] for r in resumed] == [0, 0, 0, 1, 1, 1, 2, 2]
