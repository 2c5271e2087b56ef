"""Evaluation: our Megatron-backed lm-eval model equals lm-eval's `hf` model on the exported
checkpoint (per-example log-likelihoods, generations, scores), for a dense checkpoint and an
MoE checkpoint saved at EP = 2; tools/evaluate.py's outputs and one-line errors; the suites
name real lm-eval tasks."""

from __future__ import annotations

import json
import os

import pytest
from conftest import REPO, load_tool, run_pretrain

EVAL = load_tool("evaluate")
EXPORT = load_tool("export_mcore_to_hf")
TRAIN = ["--micro-batch-size", "1", "--seq-length", "64", "--train-iters", "2", "--lr", "1e-2"]
MODELS = {"dense": (["--preset", "tiny-dense"], 1),
          "moe_ep2": (["--preset", "tiny", "--expert-model-parallel-size", "2"], 2)}


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Bundled tasks in a private cache; the HF libraries offline for the whole module."""
    from megatron_ext.evaluation import tasks

    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "MARCO_EVAL_CACHE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                      MARCO_EVAL_CACHE=str(tmp_path_factory.mktemp("eval_tasks")))
    yield tasks.ensure_bundled_tasks()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, megatron_single_rank, offline):
    """{name: (Megatron checkpoint, exported HF directory)}: 2 trainer steps each."""
    root = tmp_path_factory.mktemp("eval_ckpt")
    out = {}
    for name, (flags, nproc) in MODELS.items():
        ckpt, hf = root / name, root / f"{name}_hf"
        run = run_pretrain(*flags, *TRAIN, "--save", str(ckpt), nproc=nproc)
        assert run.returncode == 0, run.stderr[-3000:]
        assert EXPORT.main(["--load", str(ckpt), "--out", str(hf)]) == 0
        out[name] = (str(ckpt), str(hf))
    return out


def _requests(task_dir: str):
    """Multiple-choice requests over Latin, Cyrillic and CJK text, an empty context, long texts
    for the rolling windows, and generations that stop at a newline."""
    from lm_eval.api.instance import Instance

    ll, rolling, gen = [], [], []
    for lang in ("en", "ru", "zh"):
        with open(os.path.join(task_dir, f"marco_continuation_{lang}.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f][:3]
        ll += [Instance("loglikelihood", {}, (r["context"], c), 0) for r in rows for c in r["choices"]]
        rolling.append(Instance("loglikelihood_rolling", {}, (" ".join(r["context"] for r in rows) * 2,), 0))
        gen += [Instance("generate_until", {}, (r["context"], {"until": ["\n", "."], "max_gen_toks": 12}), 0)
                for r in rows[:2]]
    ll.append(Instance("loglikelihood", {}, ("", "ls - list directory contents"), 0))
    return ll, rolling, gen


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_loglikelihoods_and_generations_equal_hf(checkpoints, offline, fresh_moe_tracker, name):
    from lm_eval.models.huggingface import HFLM

    from megatron_ext.evaluation.lm import MarcoLM

    ckpt, hf_dir = checkpoints[name]
    ours = MarcoLM(load=ckpt, batch_size=5, max_length=96)  # short: rolling windows and truncation
    theirs = HFLM(pretrained=hf_dir, batch_size=5, max_length=96, dtype="float32", device="cpu")
    ll, rolling, gen = _requests(offline)
    a, b = ours.loglikelihood(ll, disable_tqdm=True), theirs.loglikelihood(ll, disable_tqdm=True)
    gap = max(abs(x[0] - y[0]) for x, y in zip(a, b))
    print(f"{name}: {len(ll)} log-likelihoods, max |ours - hf| {gap:.2e}")
    assert gap < 1e-4 and [x[1] for x in a] == [y[1] for y in b]
    assert len({round(x[0], 3) for x in a}) > len(a) // 2  # real, distinct numbers
    ra, rb = ours.loglikelihood_rolling(rolling, disable_tqdm=True), theirs.loglikelihood_rolling(
        rolling, disable_tqdm=True)
    assert all(abs(x - y) < 1e-6 * abs(y) + 1e-4 for x, y in zip(ra, rb)), (ra, rb)
    assert ours.tok_encode(rolling[0].args[0]).__len__() > 96  # more than one window
    ga, gb = ours.generate_until(gen, disable_tqdm=True), theirs.generate_until(gen, disable_tqdm=True)
    assert ga == gb and all("\n" not in g for g in ga), (ga, gb)
    ours.close()


def _run_tool(args: list[str], capsys) -> tuple[int, str, str]:
    rc = EVAL.main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_tool_scores_equal_hf_with_every_setting(checkpoints, offline, fresh_moe_tracker, tmp_path,
                                                 capsys, name):
    ckpt, hf_dir = checkpoints[name]
    tasks = "marco_continuation_en,marco_continuation_zh,marco_manqa_de"
    common = ["--tasks", tasks, "--limit", "5", "--batch-size", "4", "--bootstrap-iters", "0"]
    rc, out, err = _run_tool(["--load", ckpt, *common, "--out", str(tmp_path / "ours")], capsys)
    assert rc == 0, err[-2000:]
    rc, _, err = _run_tool(["--hf-dir", hf_dir, *common, "--out", str(tmp_path / "hf")], capsys)
    assert rc == 0, err[-2000:]
    ours = json.load(open(tmp_path / "ours" / "results.json"))
    theirs = json.load(open(tmp_path / "hf" / "results.json"))
    for task in tasks.split(","):
        for metric in ("acc,none", "acc_norm,none", "chrf,none", "exact_match,none"):
            if metric in theirs["results"][task]:
                assert ours["results"][task][metric] == pytest.approx(theirs["results"][task][metric],
                                                                       abs=1e-9), (task, metric)
    assert 0.0 <= ours["results"]["marco_continuation_en"]["acc,none"] <= 1.0
    settings = ours["marco"]
    assert (settings["model"], settings["step"], settings["dtype"], settings["batch_size"],
            settings["offline"]) == ("marco", 2, "fp32", 4, True)
    assert settings["checkpoint"].endswith("iter_0000002")
    task = settings["tasks"]["marco_continuation_zh"]
    assert (task["version"], task["num_fewshot"], task["doc_to_text"], task["normalisation"]) == (
        3.0, 0, "{{context}}", ["acc", "acc_mutual_info", "acc_norm"])
    assert settings["tasks"]["marco_manqa_de"]["generation_kwargs"]["until"] == ["\n"]
    assert settings["apply_chat_template"] is False and settings["chat_template"] is None
    summary = open(tmp_path / "ours" / "summary.md", encoding="utf-8").read()
    assert "### bundled" in summary and "### zh" in summary and "marco_manqa_de | de | chrf" in summary
    with open(tmp_path / "ours" / "bundled.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "marco_continuation_en" in out


@pytest.mark.slow
def test_chat_template_matches_the_exported_tokenizer(checkpoints, offline):
    from transformers import AutoTokenizer

    from megatron_ext.evaluation.lm import MarcoLM

    ckpt, hf_dir = checkpoints["dense"]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    lm = MarcoLM(load=ckpt)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Was macht ls?"}]
    for prompt in (True, False):
        history = chat if prompt else chat + [{"role": "assistant", "content": "ls - list"}]
        expected = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=prompt,
                                           continue_final_message=not prompt)
        text = lm.apply_chat_template(history, add_generation_prompt=prompt)
        assert text == expected
        assert lm.tok_encode(text) == tok.encode(text, add_special_tokens=False)
    assert lm.tok_encode("<|im_start|>user")[0] == tok.convert_tokens_to_ids("<|im_start|>")
    lm.close()


def test_bad_inputs_give_one_line(checkpoints, offline, tmp_path, capsys):
    ckpt, _ = checkpoints["dense"]
    out = tmp_path / "out"
    rc, _, err = _run_tool(["--load", str(tmp_path / "nope"), "--tasks", "marco_continuation_en",
                            "--out", str(out)], capsys)
    assert rc == 2 and err.strip().count("\n") == 0 and f"--load {tmp_path / 'nope'}" in err
    bad = tmp_path / "tasks"
    bad.mkdir()
    (bad / "mine.yaml").write_text("task: my_mc\ndataset_path: json\noutput_type: multiple_choice\n"
                                   "doc_to_text: '{{q}}'\ndoc_to_target: 0\n")
    rc, _, err = _run_tool(["--load", ckpt, "--tasks", "my_mc", "--include-path", str(bad),
                            "--out", str(out)], capsys)
    assert rc == 2 and err.strip().count("\n") == 0
    assert "mine.yaml: task 'my_mc' has no 'doc_to_choice'" in err
    rc, _, err = _run_tool(["--load", ckpt, "--suite", "no_such_suite", "--out", str(out)], capsys)
    assert rc == 2 and "--suite no_such_suite" in err and "bundled" in err
    (out / "x").parent.mkdir(parents=True)
    (out / "x").write_text("keep")
    rc, _, err = _run_tool(["--load", ckpt, "--tasks", "marco_continuation_en", "--out", str(out)], capsys)
    assert rc == 2 and "not empty" in err and (out / "x").read_text() == "keep"


@pytest.mark.slow
def test_unknown_task_and_every_suite_task_is_in_lm_eval(checkpoints, offline, tmp_path, capsys):
    """One full index of lm-eval's registry (bundled tasks + configs/eval/tasks included)."""
    from megatron_ext.evaluation import harness, suites

    out = tmp_path / "out"
    rc, _, err = _run_tool(["--load", checkpoints["dense"][0], "--tasks",
                            "marco_continuation_en,xnli_xx_no_such_task", "--out", str(out)], capsys)
    assert rc == 2 and err.strip().count("\n") == 0 and "unknown task 'xnli_xx_no_such_task'" in err
    assert not out.exists()  # nothing half-written
    plan = harness.plan_tasks(tasks="marco_continuation_en")
    known = set(harness._task_manager(tuple(plan.include_paths), True).all_tasks)
    checked = 0
    for name in suites.available_suites():
        suite = suites.load_suite(name)
        assert suite.tasks, name
        for entry in suite.tasks:
            assert entry.task in known, f"configs/eval/{name}.yaml: {entry.task} is not an lm-eval task"
            assert entry.num_fewshot is None or entry.num_fewshot >= 0
            checked += 1
    print(f"{checked} suite entries checked against lm-eval's registry ({len(known)} tasks)")
    assert {"english", "multilingual", "cultural", "bundled"} <= set(suites.available_suites())


def test_bundled_groups_plan_offline(offline):
    from megatron_ext.evaluation import harness

    plan = harness.plan_tasks("marco_continuation,marco_manqa_ja", suite="bundled")
    assert plan.local and plan.tasks[-1] == "marco_continuation" and len(plan.tasks) == 36
    assert plan.entries["marco_manqa_ja"].metric == "chrf" and plan.entries["marco_manqa_ja"].language == "ja"


def test_slurm_script_dry_run_and_errors(tmp_path):
    import subprocess

    from conftest import subprocess_env

    script = os.path.join(REPO, "slurm", "evaluate.sbatch")
    env = subprocess_env(MARCO_DRY_RUN="1", MARCO_EVAL_LOAD="/ckpt/mini", MARCO_EVAL_SUITE="multilingual",
                         MARCO_EVAL_ARGS="--limit 5 --apply-chat-template", MARCO_OUTPUT=str(tmp_path),
                         SLURM_JOB_ID="42")
    run = subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    command = run.stdout.strip().splitlines()[-1].split()
    assert command[:2] == ["python", "tools/evaluate.py"]
    assert EVAL.build_parser().parse_args(command[2:]).out == f"{tmp_path}/eval/multilingual-42"
    env.pop("MARCO_EVAL_LOAD")
    run = subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "set exactly one of MARCO_EVAL_LOAD" in run.stderr
