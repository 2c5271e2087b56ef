"""OPD steps as slime takes them (megatron_ext/posttrain/opd.py), end to end in process.

- The reduction is fixed once per step: 1, 2 and 4 micro-batches train the same step (losses
  and gradient norms), for sample-mean (the default) and token-mean; the two differ.
- Several optimizer steps per rollout (--global-batch-size a divisor of the rollout's rows): one
  rollout per two steps, the sampling policy's log-probs kept with it (the surrogate's ratios
  move off 1 at the rollout's second step), and a run stopped inside a rollout (its checkpoint
  holds the rollout) and resumed trains exactly what the uninterrupted run trains.
- Bad settings are one line naming the flag or the phase.
"""

from __future__ import annotations

import pytest
from test_opd import _records, _run_opd, fresh_module_tracker, teachers  # noqa: F401, F811

from megatron_ext.errors import ConfigError

BASE = ["--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "6",
        "--seed", "11", "--log-interval", "100", "--rollout-max-prompt-len", "48",
        "--adam-eps", "1e-6", "--lr", "1e-3"]
KEYS = ("opd_loss", "reverse_kl", "student_logprob", "teacher_logprob", "grad_norm", "entropy",
        "clipfrac", "logprob_diff")


def _cut(sample):
    """rollout.sample, each response of row g cut to 1 + g % 5 tokens (ending there, as at a
    stop token): the random student never samples a stop token, so every response would reach
    the length limit; this gives the global batch responses of uneven lengths, the rest of the
    step being the real one."""
    import dataclasses

    def cut(*args, **kwargs):
        out = []
        for x in sample(*args, **kwargs):
            n = 1 + x.row % 5
            routing = None if x.routing is None else x.routing[:len(x.prompt_ids) + n]
            reason = "stop" if n < len(x.output_ids) else x.finish_reason
            out.append(dataclasses.replace(x, output_ids=x.output_ids[:n], routing=routing,
                                           rollout_logprobs=x.rollout_logprobs[:n], finish_reason=reason))
        return out

    return cut


@pytest.fixture
def uneven(monkeypatch):
    from megatron_ext.posttrain import rollout

    monkeypatch.setattr(rollout, "sample", _cut(rollout.sample))


def _steps(teachers, tmp_path, name, *extra):  # noqa: F811
    log = tmp_path / f"{name}.jsonl"
    _run_opd("--teacher", teachers["moe30b"][1], "--load", teachers["student"][1], *BASE, *extra,
             "--log-json", str(log))
    return _records(log)[0]


def _same(got, want, rel=1e-5, keys=KEYS):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for key in keys:
            assert g[key] == pytest.approx(w[key], rel=rel, abs=1e-6), (g["step"], key)


def test_micro_batching_does_not_change_the_step(teachers, tmp_path, fresh_module_tracker,  # noqa: F811
                                                 uneven):
    # Without the router's aux and z-losses, which Megatron takes per micro-batch.
    no_aux = ["--moe-aux-loss-coeff", "0", "--moe-z-loss-coeff", "0"]
    runs = {}
    for reduction in ("sample-mean", "token-mean"):
        for mbs in (1, 2, 4):
            runs[reduction, mbs] = _steps(teachers, tmp_path, f"{reduction}-{mbs}", "--train-iters", "2",
                                          "--micro-batch-size", str(mbs), "--opd-loss-reduction", reduction,
                                          *no_aux)
        _same(runs[reduction, 1], runs[reduction, 4])
        _same(runs[reduction, 2], runs[reduction, 4])
    # Step 1: the same rollout and per-token values, not the same loss (uneven lengths).
    a, b = runs["sample-mean", 2][0], runs["token-mean", 2][0]
    assert a["rollout/response_length"] == b["rollout/response_length"]
    assert a["reverse_kl"] == pytest.approx(b["reverse_kl"], rel=1e-6)
    assert abs(a["opd_loss"] - b["opd_loss"]) > 1e-3
    assert b["opd_loss"] == pytest.approx(b["reverse_kl"], rel=1e-6)  # token-mean: the KL's mean
    a = runs["sample-mean", 2]
    # One step per rollout: the clip never acts, the sampler's gap is the current policy's.
    assert all(r["clipfrac"] == 0 for r in a)


def test_several_steps_per_rollout_resume_inside_a_rollout_is_exact(teachers, tmp_path,  # noqa: F811
                                                                     fresh_module_tracker,  # noqa: F811
                                                                     uneven):
    two = ["--train-iters", "4", "--global-batch-size", "2", "--micro-batch-size", "1",
           "--eps-clip", "0.001", "--use-tis"]
    straight = _steps(teachers, tmp_path, "straight", *two)
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    # A rollout every other step; the second step trains the same rollout's other rows.
    assert [r["time/rollout_sec"] > 0 for r in straight] == [True, False, True, False]
    # The old log-probs are the policy's at the rollout: ratio 1 at its first step, off 1 after
    # an update (a clip range of 0.001 catches it).
    assert straight[0]["clipfrac"] == 0 and straight[2]["clipfrac"] == 0
    assert straight[1]["clipfrac"] > 0 and straight[3]["clipfrac"] > 0
    ckpt, parts = tmp_path / "ckpt", []
    for i, exit_at in enumerate([1, 3, None]):  # stops inside rollouts 1 and 2
        load = teachers["student"][1] if i == 0 else str(ckpt)
        extra = ["--exit-interval", str(exit_at)] if exit_at else []
        log = tmp_path / f"part{i}.jsonl"
        _run_opd("--teacher", teachers["moe30b"][1], "--load", load, "--save", str(ckpt), *BASE, *two,
                 *extra, "--log-json", str(log))
        parts += _records(log)[0]
    _same(parts, straight, rel=1e-6, keys=KEYS + ("rollout/response_length", "lr"))


def test_bad_settings_name_the_flag(teachers):  # noqa: F811
    import posttrain_marco
    from megatron_ext.posttrain.opd import opd_options, resolve_opd_args

    parse = posttrain_marco.build_parser().parse_args
    base = ["opd", "--teacher", teachers["moe30b"][1], *BASE]
    cases = [(["--train-iters", "4", "--global-batch-size", "3"], "--global-batch-size 3 must divide"),
             (["--train-iters", "3", "--global-batch-size", "2"], "3 steps is not a multiple of the 2"),
             (["--train-iters", "2", "--tis-clip", "0.5", "--tis-clip-low", "1"],
              "--tis-clip 0.5 must exceed"),
             (["--train-iters", "2", "--eps-clip", "-1"], "--eps-clip must be a finite number >= 0")]
    for argv, message in cases:
        with pytest.raises(ConfigError, match=message):
            opd_options(resolve_opd_args(parse(base + argv)))


# ====================================================================== data parallelism
PARALLEL = {
    # EP 2 = DP 2, each rank sampling its own rows; two optimizer steps per rollout; replay.
    "replay": ["--train-iters", "4", "--global-batch-size", "2", "--micro-batch-size", "1",
               "--routing-replay"],
    "token-mean": ["--train-iters", "2", "--micro-batch-size", "1", "--opd-loss-reduction", "token-mean"],
}


@pytest.mark.slow
def test_data_parallel_reductions_and_replay_equal_one_process(teachers, tmp_path,  # noqa: F811
                                                               fresh_module_tracker, uneven):  # noqa: F811
    """One torchrun launch of two processes at EP=2 (DP=2): sample-mean with two steps per
    rollout and routing replay, and token-mean, each equal to one process step by step (the
    response weights' totals are summed over the data-parallel ranks once per step); at TP=2
    (sequence parallel) with replay and a transformers teacher, scored once per DP group; the
    EP=2 replay run stopped inside a rollout and resumed equals it too."""
    import json
    import subprocess
    import sys

    from conftest import REPO, _free_port, subprocess_env

    want = {name: _steps(teachers, tmp_path, f"one-{name}", *extra) for name, extra in PARALLEL.items()}
    jobs = [["opd", "--teacher", teachers["moe30b"][1], "--load", teachers["student"][1], *BASE, *extra,
             "--expert-model-parallel-size", "2", "--log-json", str(tmp_path / f"ep2-{name}.jsonl")]
            for name, extra in PARALLEL.items()]
    # The replay run again, stopped inside its first rollout (rank 0 saves every rank's rows)
    # and resumed.
    ckpt = str(tmp_path / "ckpt")
    for i, (load, stop) in enumerate([(teachers["student"][1], ["--exit-interval", "1"]), (ckpt, [])]):
        jobs.append(["opd", "--teacher", teachers["moe30b"][1], "--load", load, "--save", ckpt, *BASE,
                     *PARALLEL["replay"], *stop, "--expert-model-parallel-size", "2",
                     "--log-json", str(tmp_path / f"ep2-resume{i}.jsonl")])
    # TP 2 with a transformers teacher (every rank could score it): scored by TP rank 0 only;
    # routing replayed on each rank's sequence-parallel chunk.
    hf = ["--teacher", teachers["dense"][0], "--load", teachers["student"][1], *BASE,
          "--train-iters", "1", "--micro-batch-size", "2", "--routing-replay"]
    want["tp2-hf"] = _records(_log(tmp_path, "one-tp2-hf", hf))[0]
    jobs.append(["opd", *hf, "--tensor-model-parallel-size", "2",
                 "--log-json", str(tmp_path / "tp2-hf.jsonl")])
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), __file__, str(tmp_path / "jobs.json")]
    env = subprocess_env(OMP_NUM_THREADS="1", OPD_TEST_TEACHER_CALLS=str(tmp_path / "calls"))
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "each data-parallel rank samples its own rows" in run.stdout
    for name in PARALLEL:
        got = _records(tmp_path / f"ep2-{name}.jsonl")[0]
        _same(got, want[name], rel=1e-4, keys=KEYS + ("rollout/response_length",))
    resumed = [r for i in (0, 1) for r in _records(tmp_path / f"ep2-resume{i}.jsonl")[0]]
    _same(resumed, want["replay"], rel=1e-4, keys=KEYS + ("rollout/response_length",))
    got = _records(tmp_path / "tp2-hf.jsonl")[0]
    _same(got, want["tp2-hf"], rel=1e-4, keys=("opd_loss", "reverse_kl", "teacher_logprob", "entropy"))
    # Teacher calls of the last job per rank: two micro-batches, on TP rank 0 only.
    calls = [json.loads((tmp_path / f"calls.{rank}").read_text()) for rank in (0, 1)]
    assert calls == [2, 0]


def _log(tmp_path, name, argv):
    log = tmp_path / f"{name}.jsonl"
    _run_opd(*argv, "--log-json", str(log))
    return log


def _worker(jobs_file: str) -> None:
    """torchrun worker: posttrain_marco.py's main for each job, responses cut as `uneven`."""
    import json
    import os
    import sys
    import warnings

    warnings.filterwarnings("ignore")
    from conftest import REPO

    sys.path.insert(0, str(REPO))
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    import posttrain_marco
    from megatron_ext.logs import setup_logging
    from megatron_ext.posttrain import rollout

    rollout.sample = _cut(rollout.sample)
    setup_logging()
    calls = _count_teacher_calls()
    for argv in json.loads(open(jobs_file).read()):
        get_moe_layer_wise_logging_tracker().clear()
        calls[0] = 0
        assert posttrain_marco.main(argv) == 0
    rank = os.environ["RANK"]
    with open(f"{os.environ['OPD_TEST_TEACHER_CALLS']}.{rank}", "w") as f:
        json.dump(calls[0], f)


def _count_teacher_calls() -> list:
    """Counts the calls of Teacher.token_logprobs in this process (the last job's)."""
    from megatron_ext.posttrain import teachers as teachers_module

    calls = [0]
    score = teachers_module.Teacher.token_logprobs

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return score(self, *args, **kwargs)

    teachers_module.Teacher.token_logprobs = counted
    return calls


if __name__ == "__main__":
    import sys

    _worker(sys.argv[1])


def test_resuming_inside_a_rollout_the_checkpoint_does_not_hold_is_one_line(teachers, tmp_path,  # noqa: F811
                                                                            fresh_module_tracker):  # noqa: F811
    """A checkpoint after step 1 of one-step rollouts, resumed with two steps per rollout: step 2
    is inside a rollout that was never kept. One CheckpointError naming --load (the entry point
    prints it as one line, exit 2) before the step trains."""
    from megatron_ext.errors import CheckpointError

    ckpt = tmp_path / "ckpt"
    argv = ["--teacher", teachers["moe30b"][1], *BASE, "--train-iters", "4"]
    _run_opd(*argv, "--load", teachers["student"][1], "--save", str(ckpt), "--micro-batch-size", "2",
             "--exit-interval", "1")
    with pytest.raises(CheckpointError, match=f"--load {ckpt}: iteration 1 is inside the rollout "
                                              "that began at step 1, but the checkpoint does not hold"):
        _run_opd(*argv, "--load", str(ckpt), "--global-batch-size", "2", "--micro-batch-size", "1",
                 "--save", str(ckpt))
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
