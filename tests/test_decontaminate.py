"""Decontamination: planted overlaps in Latin, Cyrillic and CJK text are found (with their
coverage and longest match), disjoint data reports none, sharded + merged equals one pass, the
clean subset is what is left, and bad inputs give one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import load_tool

DECON = load_tool("decontaminate")

# Evaluation examples: the first three are planted whole in the training data, the fourth half,
# the last two never.
EVAL = [
    "The quick brown fox jumps over the lazy dog while the compiler links every shared object twice.",
    "Команда ls выводит список файлов каталога и сведения о каждом из них в длинном формате.",
    "此命令显示当前目录中的所有文件和子目录，并按修改时间排序，最新的文件排在最前面。",
    "Le programme lit la configuration depuis le fichier indiqué puis démarre le service demandé "
    "avec les droits de l'utilisateur courant sans jamais demander de mot de passe supplémentaire.",
    "Zebras seldom negotiate mortgage contracts with volcanic penguins on Tuesdays in Oslo.",
    "四只蓝色的鲸鱼在沙漠里弹钢琴，月亮听得睡着了。",
]
FILLER = [
    "Manual pages describe commands, files and functions of the system in a fixed layout.",
    "Страницы руководства описывают команды и файлы системы в установленном порядке.",
    "手册页按照固定的格式描述系统中的命令、文件和函数。",
]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Training data in two indexed datasets (planted and disjoint), the evaluation jsonl."""
    from megatron_ext.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("decon")
    half = EVAL[3][: len(EVAL[3]) // 2]
    planted = [{"text": f"{FILLER[i % 3]} {FILLER[(i + 1) % 3]}"} for i in range(30)]
    planted[3]["text"] += " " + EVAL[0] + " " + FILLER[1]
    planted[11]["text"] = FILLER[2] + EVAL[1]
    planted[20]["text"] = EVAL[2] + FILLER[0]
    planted[27]["text"] += " " + half
    _write_jsonl(root / "planted.jsonl", planted)
    _write_jsonl(root / "disjoint.jsonl", [{"text": FILLER[i % 3] * 3} for i in range(40)])
    prefixes = {}
    for name in ("planted", "disjoint"):
        preprocess([root / f"{name}.jsonl"], str(root / name), append_eod=True, progress=False)
        prefixes[name] = str(root / f"{name}_text_document")
    _write_jsonl(root / "eval.jsonl", [{"id": i, "text": t} for i, t in enumerate(EVAL)])
    return root, prefixes


def _run(args, capsys):
    rc = DECON.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_planted_overlaps_found_in_three_scripts_and_clean_subset(data, capsys, tmp_path):
    root, prefixes = data
    out = tmp_path / "report"
    rc, stdout, err = _run(["--data-path", prefixes["planted"], prefixes["disjoint"], "--eval-jsonl",
                            str(root / "eval.jsonl"), "--text-key", "text", "--ngram", "8",
                            "--out", str(out)], capsys)
    assert rc == 0, err
    report = json.load(open(out / "report.json"))
    rows = report["examples"]
    assert [r["index"] for r in rows] == list(range(len(EVAL)))
    assert [r["contaminated"] for r in rows] == [True, True, True, True, False, False]
    for r in rows[:3]:  # planted whole: every token covered, one match as long as the example
        assert r["coverage"] > 0.9 and r["longest_match"] >= r["tokens"] - 2, r
    assert 0.25 < rows[3]["coverage"] < 0.75 and rows[3]["longest_match"] < rows[3]["tokens"] - 8, rows[3]
    assert rows[4]["coverage"] == rows[5]["coverage"] == 0.0 and rows[5]["checked"]
    totals = report["tasks"]["eval"]
    assert (totals["examples"], totals["contaminated"], totals["clean_examples"]) == (6, 4, 2)
    assert totals["contaminated_share"] == pytest.approx(4 / 6, abs=1e-6)
    assert report["settings"]["training_tokens_scanned"] > 1000
    clean = [json.loads(line) for line in open(out / "clean" / "eval_clean.jsonl", encoding="utf-8")]
    assert [c["id"] for c in clean] == [4, 5]
    assert "4/6" in stdout


def test_disjoint_data_reports_none(data, capsys, tmp_path):
    root, prefixes = data
    rc, _, err = _run(["--data-path", "1.0", prefixes["disjoint"], "--eval-jsonl", str(root / "eval.jsonl"),
                       "--text-key", "text", "--ngram", "8", "--out", str(tmp_path / "r")], capsys)
    assert rc == 0, err
    report = json.load(open(tmp_path / "r" / "report.json"))
    assert not any(r["contaminated"] for r in report["examples"])
    assert all(r["checked"] for r in report["examples"]) and report["matched_ngrams"] == 0


def test_sharded_scan_merged_equals_one_pass(data, capsys, tmp_path):
    from megatron_ext.evaluation import decontam

    root, prefixes = data
    common = ["--data-path", prefixes["disjoint"], prefixes["planted"], "--eval-jsonl",
              str(root / "eval.jsonl"), "--text-key", "text", "--ngram", "8"]
    assert _run([*common, "--out", str(tmp_path / "one")], capsys)[0] == 0
    shards = []
    for i in range(3):
        shards.append(str(tmp_path / f"shard{i}"))
        args = [*common, "--num-shards", "3", "--shard-index", str(i), "--out", shards[-1]]
        assert _run(args, capsys)[0] == 0
    rc, _, err = _run(["--merge", *shards[:2], "--out", str(tmp_path / "bad")], capsys)
    assert rc == 2 and "shards [2] of 3 missing" in err and not (tmp_path / "bad").exists()
    assert _run(["--merge", *shards, "--out", str(tmp_path / "merged")], capsys)[0] == 0
    one = json.load(open(tmp_path / "one" / "report.json"))
    merged = json.load(open(tmp_path / "merged" / "report.json"))
    for report in (one, merged):
        assert report["tasks"]["eval"].pop("clean_subset")["examples"] == 2
    assert merged["examples"] == one["examples"] and merged["tasks"] == one["tasks"]
    assert merged["settings"]["training_tokens_scanned"] == one["settings"]["training_tokens_scanned"]
    # an n-gram that straddles the shard boundary (and chunk boundaries) is still found
    sources = decontam.open_sources([prefixes["planted"]], "test")
    ids = np.asarray(np.memmap(prefixes["planted"] + ".bin", dtype=sources[0].dtype, mode="r"))
    mid = len(ids) // 2
    target = decontam.ngram_hashes(ids[mid - 4: mid + 4], 8)
    assert len(decontam.scan(sources, target, 8, 1, 0, chunk_tokens=100)[0]) == 1
    found = [decontam.scan(sources, target, 8, 2, k, chunk_tokens=100)[0] for k in range(2)]
    assert np.array_equal(np.union1d(*found), target)


def test_lm_eval_task_clean_subset_is_a_task(data, capsys, tmp_path, monkeypatch):
    """A bundled lm-eval task against training data that holds one of its answers: the clean
    subset is written as an lm-eval task that loads with one example fewer."""
    from megatron_ext.data.preprocess import preprocess
    from megatron_ext.evaluation import harness

    monkeypatch.setenv("MARCO_EVAL_CACHE", str(tmp_path / "cache"))
    plan = harness.plan_tasks("marco_manqa_uk")
    harness.set_offline(plan)
    (_, _, rows), = harness.load_examples(plan, harness.task_manager(plan))
    _write_jsonl(tmp_path / "train.jsonl", [{"text": FILLER[1] + " " + rows[1][1]["answer"]}])
    preprocess([tmp_path / "train.jsonl"], str(tmp_path / "train"), progress=False)
    out = tmp_path / "r"
    rc, _, err = _run(["--data-path", str(tmp_path / "train_text_document"), "--tasks", "marco_manqa_uk",
                       "--ngram", "6", "--out", str(out)], capsys)
    assert rc == 0, err
    report = json.load(open(out / "report.json"))
    assert [r["index"] for r in report["examples"] if r["contaminated"]] == [1]
    plan = harness.plan_tasks("marco_manqa_uk_clean", include_paths=[str(out / "clean")])
    assert plan.local
    (name, _, clean_rows), = harness.load_examples(plan, harness.task_manager(plan))
    assert name == "marco_manqa_uk_clean" and len(clean_rows) == len(rows) - 1
    assert [r[2] for r in clean_rows] == [r[2] for i, r in enumerate(rows) if i != 1]


def test_bad_inputs_give_one_line(data, capsys, tmp_path):
    root, prefixes = data
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"question": "b"}\n')
    cases = [
        (["--eval-jsonl", str(root / "eval.jsonl"), "--text-key", "text"], "give the training data"),
        (["--data-path", str(tmp_path / "missing"), "--eval-jsonl", str(root / "eval.jsonl"), "--text-key",
          "text"], f"missing {tmp_path / 'missing'}.bin"),
        (["--data-path", prefixes["planted"], "--eval-jsonl", str(tmp_path / "bad.jsonl"),
          "--text-key", "text"], f"{tmp_path / 'bad.jsonl'}:2: no key 'text'"),
        (["--data-path", prefixes["planted"], "--eval-jsonl", str(root / "eval.jsonl")], "needs --text-key"),
        (["--data-path", prefixes["planted"], "--eval-jsonl", str(root / "eval.jsonl"), "--text-key", "text",
          "--num-shards", "2", "--shard-index", "2"], "--shard-index 2"),
    ]
    for args, expected in cases:
        rc, _, err = _run([*args, "--out", str(tmp_path / "o")], capsys)
        assert rc == 2 and err.strip().count("\n") == 0 and expected in err, (args, err)
        assert not (tmp_path / "o").exists()


def test_examples_shorter_than_the_ngram_are_unchecked_never_clean(data, capsys, tmp_path):
    """An example shorter than --ngram tokens cannot be judged: counted as unchecked, left out of
    the clean subset (it was reported clean); when no example can be checked, one line."""
    root, prefixes = data
    rows = [{"id": i, "text": t} for i, t in enumerate(EVAL)] + [{"id": 6, "text": "Zebras."}]
    _write_jsonl(tmp_path / "eval.jsonl", rows)
    common = ["--data-path", prefixes["planted"], "--eval-jsonl", str(tmp_path / "eval.jsonl"),
              "--text-key", "text"]
    rc, stdout, err = _run([*common, "--ngram", "8", "--out", str(tmp_path / "r")], capsys)
    assert rc == 0, err
    report = json.load(open(tmp_path / "r" / "report.json"))
    assert [r["checked"] for r in report["examples"]] == [True] * 6 + [False]
    totals = report["tasks"]["eval"]
    assert (totals["examples"], totals["checked"], totals["unchecked"]) == (7, 6, 1)
    assert (totals["contaminated"], totals["clean_examples"]) == (4, 2)
    assert totals["contaminated_share"] == pytest.approx(4 / 6, abs=1e-6)
    clean = [json.loads(line) for line in open(tmp_path / "r" / "clean" / "eval_clean.jsonl")]
    assert [c["id"] for c in clean] == [4, 5] and totals["clean_subset"]["examples"] == 2
    assert "4/6" in stdout and "1 unchecked (shorter than --ngram 8 tokens)" in stdout
    # --ngram longer than every example: nothing can be checked, so nothing is called clean.
    rc, stdout, err = _run([*common, "--ngram", "400", "--out", str(tmp_path / "none")], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(
        "error: --ngram 400: every evaluation example is shorter (the longest has "), err
    assert "none can be checked" in lines[0] and not (tmp_path / "none").exists()


def test_empty_non_utf8_or_surrogate_eval_jsonl_is_one_line(data, capsys, tmp_path):
    """Were a KeyError (empty file), a UnicodeDecodeError and a tokenizer traceback."""
    root, prefixes = data
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\u00e9 cr\u00e8me"}\n'.encode("latin-1"))
    (tmp_path / "surrogate.jsonl").write_text('{"text": "a"}\n{"text": "b \\ud800 c"}\n')
    cases = [
        ("empty.jsonl", [], f"--eval-jsonl {tmp_path / 'empty.jsonl'}: no examples (the file is empty)"),
        ("latin1.jsonl", [], f"--eval-jsonl {tmp_path / 'latin1.jsonl'}: not UTF-8 text"),
        ("surrogate.jsonl", [], f"{tmp_path / 'surrogate.jsonl'}:2: has a lone surrogate '\\ud800'"),
        ("surrogate.jsonl", ["--limit", "0"], "--limit 0 must be >= 1"),
    ]
    for name, extra, expected in cases:
        rc, _, err = _run(["--data-path", prefixes["planted"], "--eval-jsonl", str(tmp_path / name),
                           "--text-key", "text", *extra, "--out", str(tmp_path / "o")], capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expected}"), (name, err)
        assert not (tmp_path / "o").exists()
