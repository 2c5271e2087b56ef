"""Curriculum files and bad data input: every mistake is one clear line before any step."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data import DataConfigError, DataOptions, add_data_args
from megatron_ext.data.curriculum import load_curriculum, parse_tokens

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "configs" / "curriculum"


@pytest.fixture(scope="module")
def tok():
    from megatron_ext.data import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory, tok):
    """Two small indexed datasets, a and b (real text from the corpus)."""
    from megatron_ext.data.preprocess import preprocess

    d = tmp_path_factory.mktemp("curriculum_data")
    out = {}
    for name, lang in (("a", "de"), ("b", "fr")):
        stats = preprocess([REPO / "data" / "corpus" / f"{lang}.train.jsonl.gz"], str(d / name),
                           append_eod=True, progress=False)
        out[name] = stats.outputs["text"]
    return out


def _args(*argv):
    """DataOptions of these flags, unchecked (the tests check them)."""
    return DataOptions.from_args(add_data_args(argparse.ArgumentParser()).parse_args(list(argv)),
                                 check=False)


def _write(tmp_path, stages, sources=None, root=None, name="c.yaml") -> Path:
    doc = {"sources": sources or {"a": "a_text_document", "b": "b_text_document"}, "stages": stages}
    if root:
        doc["data_root"] = str(root)
    path = tmp_path / name
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def _error(fn, *args, **kw) -> str:
    with pytest.raises(DataConfigError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _build(path, tok, train_iters=10, gbs=4, seq=64):
    from megatron_ext.data import build_pretraining_data

    return build_pretraining_data(_args("--curriculum", str(path)), tok, global_batch_size=gbs,
                                  seq_length=seq, train_iters=train_iters, seed=1)


def test_token_counts():
    assert parse_tokens("2.4T", "x") == 2_400_000_000_000
    assert parse_tokens("300K", "x") == 300_000
    assert parse_tokens("1.02M", "x") == 1_020_000
    assert parse_tokens(5000, "x") == 5000
    assert parse_tokens("1_000", "x") == 1000
    assert "expected a token count" in _error(parse_tokens, "2.4X", "f: stage 1 's1': end")


def test_paper_schedule_matches_reference(monkeypatch, tmp_path):
    monkeypatch.setenv("MARCO_DATA_ROOT", str(tmp_path))
    cur = load_curriculum(EXAMPLES / "marco_5.1T.yaml")
    assert cur.data_root == str(tmp_path)
    assert [(s.start_tokens, s.end_tokens) for s in cur.stages] == [
        (0, 2_400_000_000_000), (2_400_000_000_000, 4_100_000_000_000),
        (4_100_000_000_000, 4_600_000_000_000), (4_600_000_000_000, 5_100_000_000_000)]
    table = {  # reference: share of tokens by source per stage (percent)
        "multilingual": (30.0, 30.0, 62.5, 87.5), "english_web_high": (20.5, 3.3, 0, 0),
        "english_web_high_synthetic": (19.5, 23.3, 14.3, 4.8), "stem": (12.3, 20.9, 11.2, 3.7),
        "math": (10.8, 6.1, 3.3, 1.1), "code": (3.4, 2.3, 1.2, 0.4),
        "synthetic": (1.8, 12.9, 6.9, 2.3), "instruction": (1.0, 0.7, 0.4, 0.1),
        "academic": (0.4, 0.3, 0.2, 0.05), "wiki": (0.3, 0.2, 0.1, 0.03)}
    for k, st in enumerate(cur.stages):
        assert {s: st.weights.get(s, 0) for s in table} == {s: v[k] for s, v in table.items()}
    new = {"bn", "cs", "ur", "kk", "el", "ro", "hu", "ne", "az"}
    assert len(cur.stages[0].languages) == 20 and not new & set(cur.stages[1].languages)
    assert set(cur.stages[2].languages) - set(cur.stages[1].languages) == new
    assert len(cur.validation) == 29
    assert cur.resolve(cur.sources["code"].prefix) == os.path.join(str(tmp_path), "code_text_document")
    # 5.1T tokens at 1024 x 4096 tokens per step: the stage boundaries in steps.
    assert [s.step_range(1024 * 4096)[1] for s in cur.stages] == [572205, 977517, 1096726, 1215935]


def test_unset_data_root_variable(monkeypatch):
    monkeypatch.delenv("MARCO_DATA_ROOT", raising=False)
    msg = _error(load_curriculum, EXAMPLES / "marco_5.1T.yaml")
    assert msg.endswith("marco_5.1T.yaml: data_root: environment variable $MARCO_DATA_ROOT is not set")


def test_tiny_schedule_adds_languages_in_stage_3():
    cur = load_curriculum(EXAMPLES / "tiny.yaml")
    assert len(cur.stages) == 4 and cur.data_root == "@sample"
    used = [set(s.weights) for s in cur.stages]
    assert used[2] - used[1] == {"cs", "el", "ro", "hu"} and used[0] == used[1]
    assert len(cur.stages[0].weights) == 15
    assert set(cur.validation) == set(cur.sources)


@pytest.mark.parametrize("stages,expected", [
    ([{"name": "s1", "end": 100, "blend": {"a": -1, "b": 1}}],
     "stage 1 's1': weight of 'a' is negative (-1)"),
    ([{"name": "s1", "end": 100, "blend": {"a": 0, "b": 0}}], "stage 1 's1': all blend weights are zero"),
    ([{"name": "s1", "end": 200, "blend": {"a": 1}}, {"name": "s2", "end": 100, "blend": {"a": 1}}],
     "stage 2 's2': end 100 must be after its start 200 (boundaries must increase)"),
    ([{"name": "s1", "end": 200, "blend": {"a": 1}},
      {"name": "s2", "start": 150, "end": 300, "blend": {"a": 1}}],
     "stage 2 's2': starts at 150 tokens, overlapping the previous stage, which ends at 200"),
    ([{"name": "s1", "end": 200, "blend": {"a": 1}},
      {"name": "s2", "start": 250, "end": 300, "blend": {"a": 1}}],
     "stage 2 's2': starts at 250 tokens, leaving a gap after 200"),
    ([{"name": "s1", "end": 100, "blend": {"c": 1}}], "stage 1 's1': blend names unknown source 'c'"),
    ([{"name": "s1", "blend": {"a": 1}}], "stage 1 's1': missing 'end'"),
    ([{"name": "s1", "end": 100, "blend": {"a": "x"}}], "stage 1 's1': weight of 'a' must be a number"),
])
def test_bad_curriculum_is_one_line_naming_file_and_stage(tmp_path, stages, expected):
    path = _write(tmp_path, stages)
    msg = _error(load_curriculum, path)
    assert msg.startswith(f"{path}: {expected}"), msg


def test_language_outside_stage_language_set(tmp_path):
    path = _write(tmp_path, [{"name": "s1", "end": 100, "languages": ["de"], "blend": {"a": 1, "b": 1}}],
                  sources={"a": {"prefix": "a", "lang": "de"}, "b": {"prefix": "b", "lang": "fr"}})
    assert _error(load_curriculum, path) == (
        f"{path}: stage 1 's1': blend uses language(s) ['fr'] not in its languages list")


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("stages:\n  - name: s1\n    end: [100\n")
    assert _error(load_curriculum, path).startswith(f"{path}: line ")


def _damaged(tmp_path, prefixes, how) -> Path:
    """A copy of dataset 'a' damaged in one way; returns the directory."""
    d = tmp_path / how
    d.mkdir()
    for ext in (".bin", ".idx"):
        (d / f"a_text_document{ext}").write_bytes(Path(prefixes["a"] + ext).read_bytes())
        (d / f"b_text_document{ext}").write_bytes(Path(prefixes["b"] + ext).read_bytes())
    idx = d / "a_text_document.idx"
    if how == "no-bin":
        (d / "a_text_document.bin").unlink()
    elif how == "no-idx":
        idx.unlink()
    elif how == "header":
        idx.write_bytes(b"GARBAGE!!" + idx.read_bytes()[9:])
    elif how == "truncated-idx":
        idx.write_bytes(idx.read_bytes()[:-100])
    elif how == "truncated-bin":
        b = d / "a_text_document.bin"
        b.write_bytes(b.read_bytes()[:-10])
    return d


@pytest.mark.parametrize("how,expected", [
    ("no-bin", "missing {d}/a_text_document.bin"),
    ("no-idx", "missing {d}/a_text_document.idx"),
    ("header", "corrupt index {d}/a_text_document.idx: not a Megatron .idx header (v1)"),
    ("truncated-idx", "corrupt index {d}/a_text_document.idx: "),
    ("truncated-bin", "{d}/a_text_document.bin has "),
])
def test_bad_indexed_dataset_named_with_stage(tmp_path, prefixes, tok, how, expected):
    d = _damaged(tmp_path, prefixes, how)
    path = _write(tmp_path, [{"name": "warmup", "end": 1000, "blend": {"a": 1, "b": 1}}], root=d)
    msg = _error(_build, path, tok)
    assert msg.startswith(f"{path}: stage 1 'warmup': source 'a': " + expected.format(d=d)), msg


def test_bad_data_path_dataset(tmp_path, prefixes, tok):
    from megatron_ext.data import build_pretraining_data

    d = _damaged(tmp_path, prefixes, "header")
    msg = _error(build_pretraining_data, _args("--data-path", str(d / "a_text_document")), tok,
                 global_batch_size=4, seq_length=64, train_iters=5, seed=1)
    assert msg == f"--data-path: corrupt index {d}/a_text_document.idx: not a Megatron .idx header (v1)"


def test_tokenizer_larger_than_model_vocab(tok):
    from megatron_ext.data import check_vocab

    check_vocab(tok, 8192)
    assert _error(check_vocab, tok, 4096) == (
        f"--tokenizer-model {tok.path}: tokenizer has 8192 tokens, more than the model's "
        "vocabulary of 4096")


def test_data_from_another_tokenizer(tmp_path, prefixes):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_ext.data import check_indexed_dataset

    msg = _error(check_indexed_dataset, prefixes["a"], "--data-path", 151_936)
    assert msg == (f"--data-path: {prefixes['a']} stores uint16 tokens, too narrow for the "
                   "tokenizer's 151936 ids: prepared with another tokenizer?")
    b = IndexedDatasetBuilder(str(tmp_path / "big.bin"), dtype=np.uint16)
    b.add_document(torch.tensor([5, 9000, 2]), [3])
    b.finalize(str(tmp_path / "big.idx"))
    assert "holds token id 9000, beyond the tokenizer's 8192 ids" in _error(
        check_indexed_dataset, str(tmp_path / "big"), "x", 8192)


def test_run_longer_than_curriculum_and_stage_shorter_than_a_batch(tmp_path, prefixes, tok):
    root = Path(prefixes["a"]).parent
    path = _write(tmp_path, [{"name": "s1", "end": 1024, "blend": {"a": 1}},
                             {"name": "s2", "end": 2048, "blend": {"a": 1, "b": 3}}], root=root)
    data = _build(path, tok, train_iters=8, gbs=4, seq=64)  # 256 tokens per step
    assert [(s.start_step, s.end_step) for s in data.stages] == [(0, 4), (4, 8)]
    assert _error(_build, path, tok, train_iters=9) == (
        f"{path}: ends at 2048 tokens (step 8 at 256 tokens per step) but --train-iters is 9")
    # Steps ceil(1100/256) = 5 to ceil(1200/256) = 5: stage 2 would get no step at all.
    short = _write(tmp_path, [{"name": "s1", "end": 1100, "blend": {"a": 1}},
                              {"name": "tiny", "end": 1200, "blend": {"b": 1}}], root=root, name="s.yaml")
    assert _error(_build, short, tok, train_iters=5) == (
        f"{short}: stage 2 'tiny': 100 tokens is less than one global batch (256 tokens)")


def test_conflicting_and_malformed_data_flags(prefixes, tok):
    from megatron_ext.data import build_pretraining_data

    def build(*argv):
        return build_pretraining_data(_args(*argv), tok, global_batch_size=4, seq_length=64,
                                      train_iters=5, seed=1)

    a = prefixes["a"]
    assert _error(build, "--mock-data", "--data-path", a) == (
        "--mock-data: not with --data-path or --curriculum")
    assert _error(build, "--data-path", "0.5", a, "x") == (
        "--data-path: expected prefixes only or 'weight prefix' pairs, got 3 values with weight '0.5'")
    assert _error(build, "--data-path", "w", a, "1", a).startswith("--data-path: 'w' is not a weight")
    assert _error(build, "--data-path", "0", a, "0", a) == "--data-path: all weights are zero"
    assert _error(build, "--data-path", "-1", a, "1", a) == f"--data-path: weight -1 of {a} must be >= 0"
    assert _error(build, "--data-path", a, "--split", "0,1,0").startswith("--split 0,1,0: expected")
    # A dataset too small to give the valid split a single document (Megatron would loop).
    msg = _error(build, "--data-path", a, "--split", "999,1,0")
    assert msg.startswith(f"--split 999,1,0: {a} has ") and "none for the valid split" in msg


def test_parse_time_checks_read_no_data(tmp_path):
    from megatron_ext.data import check_data_options

    check_data_options(_args("--curriculum", str(EXAMPLES / "tiny.yaml")))
    check_data_options(_args("--data-path", "0.3", "/nonexistent/a", "0.7", "/nonexistent/b"))
    bad = _write(tmp_path, [{"name": "s1", "end": 100, "blend": {"a": 0}}])
    assert _error(check_data_options, _args("--curriculum", str(bad))) == (
        f"{bad}: stage 1 's1': all blend weights are zero")
    assert _error(check_data_options, _args("--curriculum", str(tmp_path / "none.yaml"))).startswith(
        f"--curriculum {tmp_path / 'none.yaml'}: cannot read")
    assert _error(check_data_options, _args("--curriculum", str(bad), "--data-path", "x")) == (
        "--curriculum: the file names the data; drop --data-path")
