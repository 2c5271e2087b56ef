"""Bad input to the post-training, generation and evaluation tools: each is one `error:` line
naming the flag or file and what was expected, exit status 2, and nothing written.

Every case runs in this process, before any model is built (a damaged checkpoint here is a
hand-made directory: its marco_model.json is read before the weights), so the module takes
seconds. Decontamination and chat preprocessing have theirs in tests/test_decontaminate.py
and tests/test_sft_data.py; a save directory that --load reads in tests/test_reliability.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_tool

from megatron_ext.errors import ConfigError, DataConfigError

GENERATE, EVALUATE = load_tool("generate"), load_tool("evaluate")
SURROGATE = '"ls \\ud800 -l"'  # a JSON escape that decodes to a lone surrogate


def _one_line(capsys) -> list[str]:
    err = capsys.readouterr().err.strip().splitlines()
    return [line for line in err if line.startswith("error:")] if len(err) == 1 else err


@pytest.fixture
def damaged_checkpoint(tmp_path) -> Path:
    """A checkpoint root whose latest iteration has an unparseable marco_model.json."""
    it = tmp_path / "ckpt" / "iter_0000001"
    it.mkdir(parents=True)
    (it.parent / "latest_checkpointed_iteration.txt").write_text("1")
    (it / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (it / "marco_model.json").write_text('{"preset": {"name": "tiny", ')
    return it.parent


def _damaged_line(ckpt: Path) -> str:
    return (f"error: {ckpt / 'iter_0000001' / 'marco_model.json'}: not a readable marco_model.json "
            "(JSONDecodeError: ")


# ------------------------------------------------------------------------------ generate
def _generate(tmp_path, capsys, lines: list[str], *extra: str, load=None, out=None):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = out or tmp_path / "o.jsonl"
    code = GENERATE.main(["--load", str(load or tmp_path), "--prompts", str(prompts),
                          "--out", str(out), *extra])
    return code, _one_line(capsys)


def test_generate_prompt_errors_name_the_line(tmp_path, capsys):
    """A lone surrogate (was a tokenizer traceback), a line with neither key (was "...not
    both"), one with both."""
    messages = json.dumps([{"role": "user", "content": "x"}])
    for line, says in [
        (f'{{"prompt": {SURROGATE}}}', "p.jsonl:1: has a lone surrogate '\\ud800'; expected valid "
                                       "Unicode text"),
        (f'{{"messages": [{{"role": "user", "content": {SURROGATE}}}]}}',
         "p.jsonl:1: has a lone surrogate '\\ud800'; expected valid Unicode text"),
        ('{"text": "x"}', 'p.jsonl:1: expected an object with either "prompt" (text) or "messages" '
                          '(a chat), found neither'),
        (f'{{"prompt": "x", "messages": {messages}}}',
         'p.jsonl:1: has both "prompt" and "messages"; expected one of them'),
    ]:
        code, err = _generate(tmp_path, capsys, [line])
        assert code == 2 and len(err) == 1 and err[0].endswith(says), (line, err)
        assert str(tmp_path / "p.jsonl") in err[0]
        assert not (tmp_path / "o.jsonl").exists()


def test_generate_output_under_a_regular_file(tmp_path, capsys):
    """Was "cannot write (File exists)"."""
    (tmp_path / "f").write_text("a file")
    out = tmp_path / "f" / "sub" / "o.jsonl"
    code, err = _generate(tmp_path, capsys, ['{"prompt": "x"}'], out=out)
    assert code == 2 and err == [f"error: --out {out}: {tmp_path / 'f'} is a file; expected a "
                                 "directory (or a path to create) to hold the output file"], err
    assert (tmp_path / "f").read_text() == "a file"


def test_generate_damaged_model_record(tmp_path, capsys, damaged_checkpoint):
    code, err = _generate(tmp_path, capsys, ['{"prompt": "x"}'], load=damaged_checkpoint)
    assert code == 2 and len(err) == 1 and err[0].startswith(_damaged_line(damaged_checkpoint)), err
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------------------ evaluate
@pytest.fixture
def task_dir(tmp_path) -> Path:
    """An --include-path folder: one local JSON task (its data file exists)."""
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "data.jsonl").write_text('{"q": "a", "a": "b"}\n')
    task = {"task": "mini_qa", "dataset_path": "json", "output_type": "generate_until",
            "dataset_kwargs": {"data_files": {"test": str(d / "data.jsonl")}}, "test_split": "test",
            "doc_to_text": "{{q}}", "doc_to_target": "{{a}}"}
    (d / "mini_qa.yaml").write_text(json.dumps(task))
    return d


def _evaluate(tmp_path, capsys, *extra: str, load=None):
    code = EVALUATE.main(["--load", str(load or tmp_path), "--out", str(tmp_path / "out"), *extra])
    return code, _one_line(capsys)


@pytest.mark.parametrize("flags,says", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),  # was accepted, recorded as 0
    (["--limit", "0"], "--limit must be a whole number of examples >= 1 or a fraction in (0, 1), "
                       "got 0"),
    (["--limit", "-1"], "--limit must be a whole number of examples >= 1 or a fraction in (0, 1), "
                        "got -1"),
])
def test_evaluate_bad_numbers(tmp_path, capsys, task_dir, flags, says):
    code, err = _evaluate(tmp_path, capsys, "--tasks", "mini_qa", "--include-path", str(task_dir),
                          *flags)
    assert code == 2 and err == [f"error: {says}"], err
    assert not (tmp_path / "out").exists()


def test_evaluate_task_data_file_missing(tmp_path, capsys, task_dir):
    """Was "writing --out ... failed" (datasets' FileNotFoundError caught as a write error)."""
    (task_dir / "data.jsonl").unlink()
    code, err = _evaluate(tmp_path, capsys, "--tasks", "mini_qa", "--include-path", str(task_dir))
    assert code == 2 and err == [
        f"error: --include-path {task_dir / 'mini_qa.yaml'}: task 'mini_qa' reads "
        f"{task_dir / 'data.jsonl'} (dataset_kwargs.data_files), which does not exist"], err
    assert not (tmp_path / "out").exists()


def test_evaluate_unreadable_task_data_is_not_a_write_error(tmp_path, capsys, task_dir, monkeypatch):
    """A data file lm-eval cannot read while evaluating (e.g. a glob, a dataset directory) was
    reported as "writing --out ... failed"."""
    class Model:
        def close(self):
            pass

    def unreadable(*args):
        raise FileNotFoundError(2, "No such file or directory", str(task_dir / "part-*.jsonl"))

    monkeypatch.setattr(EVALUATE, "build_model", lambda args: Model())
    monkeypatch.setattr(EVALUATE, "evaluate", unreadable)
    code, err = _evaluate(tmp_path, capsys, "--tasks", "mini_qa", "--include-path", str(task_dir))
    assert code == 2 and len(err) == 1 and err[0].startswith("error: reading the tasks' data failed ("), err
    assert "part-*.jsonl" in err[0] and "--out" in err[0] and "writing" not in err[0]
    assert not (tmp_path / "out").exists()


def test_evaluate_damaged_model_record(tmp_path, capsys, task_dir, damaged_checkpoint):
    code, err = _evaluate(tmp_path, capsys, "--tasks", "mini_qa", "--include-path", str(task_dir),
                          load=damaged_checkpoint)
    assert code == 2 and len(err) == 1 and err[0].startswith(_damaged_line(damaged_checkpoint)), err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ posttrain_marco.py
def _posttrain(argv, monkeypatch, capsys):
    """posttrain_marco.py's entry point in this process: (exit status, `error:` lines)."""
    from conftest import signal_handlers_given_back

    import posttrain_marco
    from megatron_ext import cli, parallel

    monkeypatch.setattr(parallel, "shutdown", lambda: None)  # keep this process's Megatron state
    capsys.readouterr()
    with signal_handlers_given_back():
        status = cli.entry_point(posttrain_marco.main, argv)
    return status, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_sft_load_of_a_damaged_model_record(tmp_path, monkeypatch, capsys, damaged_checkpoint):
    """Was a JSONDecodeError traceback."""
    code, err = _posttrain(["sft", "--load", str(damaged_checkpoint), "--save", str(tmp_path / "s"),
                            "--train-iters", "1"], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(_damaged_line(damaged_checkpoint)), err
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------ OPD
@pytest.fixture
def hf_teacher(tmp_path) -> str:
    """A directory that reads as a Hugging Face teacher (its weights are never loaded here)."""
    d = tmp_path / "teacher"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return str(d)


def _opd_args(*argv):
    import posttrain_marco

    return posttrain_marco.build_parser().parse_args(["opd", *argv])


def _cascade(tmp_path, teacher: str, settings: str = "", overrides: str = "") -> str:
    path = tmp_path / "cascade.yaml"
    text = f"settings: {{{settings}}}\n" if settings else ""
    text += f"phases:\n  - {{teacher: {teacher}, steps: 2"
    text += f", overrides: {{{overrides}}}}}\n" if overrides else "}\n"
    path.write_text(text)
    return str(path)


def test_opd_samples_per_prompt_is_named(tmp_path, hf_teacher):
    """Was "--global-batch-size ... got -2" (the product of the batch and -1)."""
    from megatron_ext.posttrain.opd import resolve_opd_args

    with pytest.raises(ConfigError, match=r"^--n-samples-per-prompt must be an integer >= 1, got -1$"):
        resolve_opd_args(_opd_args("--teacher", hf_teacher, "--train-iters", "1",
                                   "--n-samples-per-prompt", "-1"))
    cascade = _cascade(tmp_path, hf_teacher, settings="n-samples-per-prompt: -1")
    with pytest.raises(ConfigError, match=rf"^{cascade}: settings: --n-samples-per-prompt must be "
                                          r"an integer >= 1, got -1$"):
        resolve_opd_args(_opd_args("--cascade", cascade))
    for bad in ("2.5", "'x'"):
        with pytest.raises(ConfigError, match=r"settings: --n-samples-per-prompt must be an integer"):
            resolve_opd_args(_opd_args("--cascade", _cascade(tmp_path, hf_teacher,
                                                             settings=f"n-samples-per-prompt: {bad}")))
    cascade = _cascade(tmp_path, hf_teacher, settings="n-samples-per-prompt: '3'")  # read as int()
    args = resolve_opd_args(_opd_args("--cascade", cascade, "--rollout-batch-size", "2"))
    assert args.global_batch_size == 6


def test_opd_setting_is_blamed_where_it_was_given(tmp_path, hf_teacher):
    """A command-line --rollout-top-p 0 was blamed on the cascade's phase 1."""
    from megatron_ext.posttrain.opd import opd_options, resolve_opd_args

    def check(*argv):
        return opd_options(resolve_opd_args(_opd_args(*argv)))

    says = r"--rollout-top-p must be in \(0, 1\], got 0.0$"
    cascade = _cascade(tmp_path, hf_teacher)
    for argv in (["--cascade", cascade], ["--teacher", hf_teacher, "--train-iters", "2"]):
        with pytest.raises(ConfigError, match=f"^{says}"):
            check(*argv, "--rollout-top-p", "0")
    with pytest.raises(ConfigError, match=f"^{cascade}: settings: {says}"):
        check("--cascade", _cascade(tmp_path, hf_teacher, settings="rollout-top-p: 0"))
    with pytest.raises(ConfigError, match=f"^{cascade}: phase 1: {says}"):
        check("--cascade", _cascade(tmp_path, hf_teacher, overrides="rollout-top-p: 0"))
    assert check("--cascade", _cascade(tmp_path, hf_teacher, settings="rollout-top-p: 0.9"))


def test_opd_teacher_tokenizer_without_chatml_is_the_teachers(tmp_path, hf_teacher):
    """Was reported as the student's --tokenizer-model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_ext.posttrain.teachers import TeacherSpec, teacher_tokenizer

    words = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hello": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tmp_path / "plain-tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(tok))
    with pytest.raises(ConfigError) as e:
        teacher_tokenizer(TeacherSpec(hf_teacher, "hf", tokenizer=str(tok)))
    assert str(e.value).startswith(f"teacher {hf_teacher}: its tokenizer {tok}: '<|im_start|>' is "
                                   "not a single token"), e.value
    assert "--tokenizer-model" not in str(e.value) and "\n" not in str(e.value)


def test_opd_prompt_data_with_a_lone_surrogate(tmp_path):
    """Was a tokenizer traceback at the first rollout."""
    from megatron_ext.inference.chat import ChatTokenizer
    from megatron_ext.posttrain.rollout import PromptSet

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n'
                    f'{{"messages": [{{"role": "user", "content": {SURROGATE}}}]}}\n')
    tok = ChatTokenizer.from_args("SentencePieceTokenizer", None)
    with pytest.raises(DataConfigError, match=rf"^{path}:2: message 0 \(user\) content has a lone "
                                              r"surrogate '\\ud800' at character 3"):
        PromptSet([str(path)], tok, 64, "--prompt-data")
