"""`posttrain_marco.py sft` end to end on CPU: the pre-training trainer with chat data.

A pre-trained checkpoint gives its weights only (fresh optimizer, iteration 0); the
assistant-token loss falls on the bundled SFT sample; an SFT run resumes exactly; --skip-train
evaluates the held-out set without a step.
"""

import json
import subprocess
import sys

import pytest
from conftest import REPO, pretrained_checkpoint, subprocess_env

TINY = ["--preset", "tiny", "--micro-batch-size", "2", "--seq-length", "128", "--seed", "11",
        "--log-interval", "100"]


def run_posttrain(*args: str, timeout: int = 600):
    cmd = [sys.executable, str(REPO / "posttrain_marco.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def _records(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return pretrained_checkpoint(tmp_path_factory.mktemp("sft") / "base", *TINY, "--mock-data",
                                 "--train-iters", "3")


@pytest.mark.slow
def test_sft_from_a_base_checkpoint_learns_and_resumes_exactly(base, tmp_path):
    common = [*TINY, "--train-iters", "12", "--lr", "3e-3", "--min-lr", "3e-4",
              "--lr-warmup-iters", "1"]
    straight = run_posttrain("sft", *common, "--load", str(base),
                             "--log-json", str(tmp_path / "straight.jsonl"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "training starts at iteration 0" in straight.stdout  # weights only, fresh optimizer
    records = [r for r in _records(tmp_path / "straight.jsonl") if "lm_loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))
    losses = [r["lm_loss"] for r in records]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses  # assistant tokens learnt

    ckpt = tmp_path / "ckpt"
    first = run_posttrain("sft", *common, "--load", str(base), "--save", str(ckpt),
                          "--exit-interval", "6", "--log-json", str(tmp_path / "first.jsonl"))
    assert first.returncode == 0, first.stderr[-3000:]
    info = json.loads((ckpt / "iter_0000006" / "marco_model.json").read_text())
    assert info["run"]["kind"] == "sft"
    # An SFT checkpoint resumes (optimizer, schedule, RNG, data position), not weights only.
    second = run_posttrain("sft", *common, "--load", str(ckpt), "--save", str(ckpt),
                           "--log-json", str(tmp_path / "second.jsonl"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    resumed = [r for r in _records(tmp_path / "first.jsonl") + _records(tmp_path / "second.jsonl")
               if "lm_loss" in r]
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["lm_loss"] for r in resumed] == pytest.approx(losses, rel=1e-6, abs=1e-6)

    # Evaluation only: the held-out assistant loss of the SFT model, no step taken.
    held = run_posttrain("sft", *common, "--load", str(ckpt), "--skip-train",
                         "--log-json", str(tmp_path / "eval.jsonl"))
    assert held.returncode == 0, held.stderr[-3000:]
    [result] = _records(tmp_path / "eval.jsonl")
    assert result["step"] == 12 and 0 < result["validation/lm_loss/sft_valid"] < losses[0]
    assert " lm loss " not in held.stdout.replace("validation lm loss", "")
