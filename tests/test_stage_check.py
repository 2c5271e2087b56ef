"""slurm/pretrain_stage.py --help and --plan --check (issue: the cluster user's path): before
anything is queued, every input a stage reads (start checkpoint, tokenizer, each source and
validation prefix of the curriculum) is checked and each missing one named. In-process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _stage_tool():
    spec = importlib.util.spec_from_file_location("pretrain_stage", REPO / "slurm" / "pretrain_stage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _curriculum(root: Path) -> Path:
    path = root / "cur.yaml"
    path.write_text(f"""data_root: {root / 'data'}
sources:
  web: web_text_document
  code: code_text_document
validation:
  en: valid/en_text_document
stages:
  - name: one
    end: 40960
    blend: {{web: 70, code: 30}}
  - name: two
    end: 81920
    blend: {{web: 50, code: 50}}
""")
    return path


def _prefix(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".bin", ".idx"):
        path.with_name(path.name + ext).write_bytes(b"x")


def test_help_exits_0_and_documents_plan_and_check(capsys):
    with pytest.raises(SystemExit) as exit:
        _stage_tool().main(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "--plan" in out and "--check" in out and "PRETRAIN_FLAGS" in out


def test_plan_check_names_every_missing_input_then_passes(tmp_path, capsys):
    tool = _stage_tool()
    cur = _curriculum(tmp_path)
    init, tok = tmp_path / "nano" / "upcycled", tmp_path / "tokenizer"
    argv = ["--stage", "1", "--start-from", str(init), "--plan", "--check", "--",
            "--preset", "tiny", "--global-batch-size", "4", "--seq-length", "1024",
            "--curriculum", str(cur), "--save", str(tmp_path / "stage1"),
            "--tokenizer-model", str(tok), "--lr-decay-style", "WSD"]
    _prefix(tmp_path / "data" / "web_text_document")
    assert tool.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert f"error: --start-from {init}: no complete checkpoint (no latest_checkpointed_iteration.txt)" in err
    assert f"error: --tokenizer-model {tok}: no such file or directory" in err
    assert f"error: {cur}: source code: {tmp_path}/data/code_text_document.bin/.idx not found" in err
    assert f"error: {cur}: validation en: {tmp_path}/data/valid/en_text_document.bin/.idx not found" in err
    assert not any("web_text_document" in line for line in err)
    assert err[-1] == "error: 4 inputs of stage 1 are missing"

    _prefix(tmp_path / "data" / "code_text_document")
    _prefix(tmp_path / "data" / "valid" / "en_text_document")
    tok.mkdir()
    init.mkdir(parents=True)
    (init / "latest_checkpointed_iteration.txt").write_text("0")
    assert tool.main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    argv_out = plan["argv"]
    # The resolved command carries what the stage adds: --train-iters and the decay.
    assert argv_out[argv_out.index("--train-iters") + 1] == "10"  # 40960 tokens / (4 x 1024)
    assert argv_out[argv_out.index("--lr-decay-iters") + 1] == "20"
    assert argv_out[argv_out.index("--lr-wsd-decay-iters") + 1] == "10"
    assert argv_out[argv_out.index("--load") + 1] == str(init)


def test_an_upcycled_start_that_is_missing_says_to_upcycle(tmp_path, capsys):
    cur = _curriculum(tmp_path)
    init = tmp_path / "nano" / "upcycled"
    assert _stage_tool().main(["--stage", "1", "--start-from", str(init), "--plan", "--",
                               "--global-batch-size", "4", "--seq-length", "1024",
                               "--curriculum", str(cur), "--save", str(tmp_path / "s1")]) == 2
    assert f"run tools/upcycle_hf_to_mcore.py --save {init} first" in capsys.readouterr().err


def test_nemo_run_dry_run_leaves_nothing_and_names_the_stage_once(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(HOME=str(tmp_path / "home"), NEMORUN_HOME=str(tmp_path / "nemo_run"),
               PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, str(REPO / "examples" / "launch_nemo_run.py"),
                          "--model", "mini", "--stage", "1", "--executor", "slurm",
                          "--account", "a", "--partition", "p", "--dryrun",
                          "--job-dir", str(tmp_path / "jobs"), "--sbatch-out",
                          str(tmp_path / "job.sbatch")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.sbatch"]  # no experiment dirs
    output = next(line for line in (tmp_path / "job.sbatch").read_text().splitlines()
                  if line.startswith("#SBATCH --output="))
    path = output.split("=", 1)[1]
    assert path.startswith(f"{tmp_path}/jobs/marco/marco_"), path
    assert path.count("mini-stage1") == 2, path  # the task's directory, and the job name in the file name
    assert "/mini-stage1/sbatch_marco-mini-stage1_%j.out" in path


def _launch_dry_run(mode: str, model: str, tmp_path, **env):
    import os
    import subprocess

    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(MARCO_DRY_RUN=mode, MARCO_OUTPUT=str(tmp_path / "out"),
             MARCO_DATA_ROOT=str(tmp_path / "data"), **env)
    return subprocess.run(["bash", str(REPO / "slurm" / "launch.sh"), model, "1"], cwd=REPO,
                          env=e, capture_output=True, text=True, timeout=300)


def test_slurm_dry_run_shows_train_iters_and_decay_and_check_names_missing_data(tmp_path):
    out = _launch_dry_run("1", "nano", tmp_path)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    # 5.1T tokens' stage 1 (2.4T) at Nano's 1024 x 4096 tokens per step.
    assert first.startswith("# stage 1: steps 0 -> 572205 (stage ends at 572205); pretrain_marco.py "
                            "gets --train-iters 572205 --lr-decay-iters 1215935 "
                            "--lr-wsd-decay-iters 119209"), first
    data = tmp_path / "data"
    assert (f"# error: {REPO}/configs/curriculum/marco_5.1T.yaml: source code: "
            f"{data}/code_text_document.bin/.idx not found") in out.stdout.splitlines()
    strict = _launch_dry_run("check", "nano", tmp_path)
    assert strict.returncode == 2 and "inputs of nano stage 1 are missing" in strict.stderr
    cpu = _launch_dry_run("check", "mini", tmp_path, MARCO_CPU="1")  # bundled data, random init
    assert cpu.returncode == 0, cpu.stderr + cpu.stdout
    assert "--train-iters" in cpu.stdout.splitlines()[0] and "error" not in cpu.stdout
