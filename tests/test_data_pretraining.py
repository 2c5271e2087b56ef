"""The data API of the trainer on the tiny curriculum: shares, boundaries, ranks, resume."""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.data import DataOptions, add_data_args

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "curriculum" / "tiny.yaml"
GBS, SEQ, ITERS, SEED = 8, 128, 997, 1234  # 1024 tokens per step; tiny.yaml ends at step 997


def _args(cache, *argv):
    return DataOptions.from_args(add_data_args(argparse.ArgumentParser()).parse_args(
        [*argv, "--data-cache-path", str(cache)]))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "marco-data-cache"


@pytest.fixture(scope="module")
def tok():
    from megatron_ext.data import build_tokenizer

    return build_tokenizer()


def _build(cache, tok, *argv, gbs=GBS, seq=SEQ, iters=ITERS):
    from megatron_ext.data import build_pretraining_data

    return build_pretraining_data(_args(cache, *argv), tok, global_batch_size=gbs,
                                  seq_length=seq, train_iters=iters, seed=SEED)


@pytest.fixture(scope="module")
def tiny(cache, tok):
    return _build(cache, tok, "--curriculum", str(TINY))


def _fingerprint(data, steps, dp_rank, dp_size, mbs) -> str:
    h = hashlib.sha256()
    for step in steps:
        for mb in data.micro_batches(step, dp_rank, dp_size, mbs):
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                h.update(mb[key].numpy().tobytes())
    return h.hexdigest()


def test_stage_boundaries_and_shares(tiny):
    from megatron_ext.data import load_curriculum

    cur = load_curriculum(TINY)
    bounds = [math.ceil(s.end_tokens / (GBS * SEQ)) for s in cur.stages]
    assert bounds == [469, 801, 899, 997]
    assert [(s.start_step, s.end_step) for s in tiny.stages] == list(zip([0, *bounds[:-1]], bounds))
    before = {}
    for k, (st, spec) in enumerate(zip(tiny.stages, cur.stages)):
        assert tiny.stage_at(st.start_step) == k and tiny.stage_at(st.end_step - 1) == k
        counts: dict[str, int] = {}
        for step in range(st.start_step, st.end_step):
            for src in tiny.batch_sources(step):
                counts[src] = counts.get(src, 0) + 1
        total = sum(counts.values())
        assert total == (st.end_step - st.start_step) * GBS
        want = {s: w / sum(spec.weights.values()) for s, w in spec.weights.items()}
        assert set(counts) == set(want), f"stage {k}: sources {sorted(counts)}"
        for src, w in want.items():
            share = counts[src] / total
            assert abs(share - w) < 0.01, f"stage {k} {src}: {share:.4f} vs {w:.4f}"
        # Consumed tokens per source: the same counts, cumulative over stages.
        after = tiny.consumed_tokens_by_source(st.end_step - 1)
        for src in set(after) | set(before):
            assert after.get(src, 0) - before.get(src, 0) == counts.get(src, 0) * SEQ
        before = after
    assert sum(before.values()) == ITERS * GBS * SEQ


def test_switch_happens_at_the_boundary_step(tiny):
    new = {"cs", "el", "ro", "hu"}
    assert tiny.stage_at(800) == 1 and tiny.stage_at(801) == 2
    seen_before = {s for step in range(469, 801) for s in tiny.batch_sources(step)}
    assert not seen_before & new
    first_steps = {s for step in range(801, 811) for s in tiny.batch_sources(step)}
    assert first_steps & new
    # Stage 1 -> 2: English share drops from 42 % to 19 % right at step 469.
    def en(steps):
        return sum(tiny.batch_sources(s).count("en") for s in steps) / (len(steps) * GBS)

    assert abs(en(range(419, 469)) - 0.42) < 0.03 and abs(en(range(469, 519)) - 0.19) < 0.03


def _source_text(lang: str) -> str:
    with gzip.open(REPO / "data" / "corpus" / f"{lang}.train.jsonl.gz", "rt", encoding="utf-8") as f:
        return "\n".join(json.loads(line)["text"] for line in f)


def test_rows_hold_text_of_their_source(tiny, tok):
    texts: dict[str, str] = {}
    checked = 0
    for step in (0, 470, 801, 900):
        rows = tiny.micro_batches(step, 0, 1, GBS)[0]["tokens"]
        for src, row in zip(tiny.batch_sources(step), rows.tolist()):
            # The longest run without an end-of-document token, minus a few tokens at each end
            # (a row may start or stop inside a byte-fallback character).
            runs, cur = [], []
            for t in row + [tok.eod]:
                if t == tok.eod:
                    runs.append(cur)
                    cur = []
                else:
                    cur.append(t)
            run = max(runs, key=len)[4:-4]
            if len(run) < 16:
                continue
            texts.setdefault(src, _source_text(src))
            assert tok.detokenize(run) in texts[src], f"step {step}: row is not from '{src}'"
            checked += 1
    assert checked >= 24


def test_batches_are_tensors_of_the_right_shape(tiny):
    mbs = tiny.micro_batches(5, 1, 2, 2)
    assert len(mbs) == GBS // (2 * 2)
    for mb in mbs:
        assert set(mb) == {"tokens", "labels", "loss_mask", "position_ids"}
        for key in ("tokens", "labels", "position_ids"):
            assert mb[key].shape == (2, SEQ) and mb[key].dtype == torch.int64
        assert mb["loss_mask"].dtype == torch.float32
        assert torch.equal(mb["position_ids"][0], torch.arange(SEQ))
        assert torch.equal(mb["tokens"][:, 1:], mb["labels"][:, :-1])


def test_data_parallel_ranks_read_disjoint_rows_of_the_global_batch(tiny):
    for step in (3, 468, 469):
        full = tiny.micro_batches(step, 0, 1, GBS)[0]["tokens"]
        rows = []
        for m in range(2):  # micro-batch m of rank r holds rows m*4 + r*2 + (0, 1)
            for r in range(2):
                rows.append(tiny.micro_batches(step, r, 2, 2)[m]["tokens"])
        assert torch.equal(torch.cat(rows), full)
    with pytest.raises(ValueError):
        tiny.micro_batches(0, 0, 3, 2)  # 8 rows do not split over 3 ranks x 2


def test_resume_reads_the_same_samples(tiny, cache, tok):
    # "Continuing": one object walks steps 460-480 in order, across the stage 0 -> 1 boundary.
    walked = {s: tiny.micro_batches(s, 1, 2, 2) for s in range(460, 481)}
    # "Resumed": a fresh object asked directly for step 470 onwards.
    fresh = _build(cache, tok, "--curriculum", str(TINY))
    for s in range(470, 481):
        for a, b in zip(walked[s], fresh.micro_batches(s, 1, 2, 2)):
            assert all(torch.equal(a[k], b[k]) for k in a)
    # A fresh process too (no state shared through this interpreter).
    steps = [467, 468, 469, 470, 800, 801, 996]
    code = (
        "import argparse, hashlib, sys, warnings; warnings.filterwarnings('ignore')\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from megatron_ext.data import DataOptions, build_tokenizer, build_pretraining_data\n"
        f"args = DataOptions(curriculum={str(TINY)!r}, data_cache_path={str(cache)!r})\n"
        f"d = build_pretraining_data(args, build_tokenizer(), global_batch_size={GBS}, "
        f"seq_length={SEQ}, train_iters={ITERS}, seed={SEED})\n"
        "h = hashlib.sha256()\n"
        f"for s in {steps}:\n"
        "    for mb in d.micro_batches(s, 1, 2, 2):\n"
        "        for k in ('tokens', 'labels', 'loss_mask', 'position_ids'):\n"
        "            h.update(mb[k].numpy().tobytes())\n"
        "print(h.hexdigest())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == _fingerprint(tiny, steps, 1, 2, 2)


def test_validation_per_language_is_fixed(tiny, tok):
    names = tiny.validation_names()
    assert len(names) == 19 and "el" in names and "zh" in names
    a = tiny.validation_micro_batches("el", 3, 0, 2, 2)
    b = tiny.validation_micro_batches("el", 3, 0, 2, 2)
    other_rank = tiny.validation_micro_batches("el", 3, 1, 2, 2)
    assert len(a) == 3 and a[0]["tokens"].shape == (2, SEQ)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["tokens"], other_rank[0]["tokens"])
    with gzip.open(REPO / "data" / "corpus" / "el.valid.jsonl.gz", "rt") as f:
        el_valid = json.loads(f.readline())["text"]
    row = [t for t in a[0]["tokens"][0].tolist() if t != tok.eod][4:40]
    assert tok.detokenize(row) in el_valid
    assert set(tiny.validation_sets()) == set(names)


def test_default_is_the_sample_corpus_in_its_natural_mix(cache, tok):
    data = _build(cache, tok, iters=60)
    assert len(data.stages) == 1 and data.stage_at(59) == 0
    assert len(data.validation_names()) == 19
    st = data.stages[0]
    sizes = dict(zip(st.sources, st.weights))
    counts: dict[str, int] = {}
    for s in range(60):
        for src in data.batch_sources(s):
            counts[src] = counts.get(src, 0) + 1
    for src, w in sizes.items():
        assert abs(counts.get(src, 0) / (60 * GBS) - w / sum(sizes.values())) < 0.01


def test_weighted_data_path_with_split_and_mock(cache, tok):
    from megatron_ext.data import prepare_sample_corpus

    info = prepare_sample_corpus(cache)
    de, ja = info["train"]["de"], info["train"]["ja"]
    data = _build(cache, tok, "--data-path", "0.3", de, "0.7", ja, "--split", "90,10,0", iters=50)
    counts = [src for s in range(50) for src in data.batch_sources(s)]
    assert abs(counts.count("de_train") / len(counts) - 0.3) < 0.01
    assert data.validation_names() == ["de_train", "ja_train"]
    v = data.validation_micro_batches("ja_train", 2, 0, 1, 4)
    assert len(v) == 2 and v[0]["tokens"].shape == (4, SEQ)
    for step in (49, 9, 30, 49):  # any order: counts do not depend on earlier calls
        rows = counts[:(step + 1) * GBS]
        assert data.consumed_tokens_by_source(step) == {
            "de_train": rows.count("de_train") * SEQ, "ja_train": rows.count("ja_train") * SEQ}

    mock = _build(cache, tok, "--mock-data", iters=20)
    mb = mock.micro_batches(19, 0, 1, 4)
    assert len(mb) == 2 and mb[0]["tokens"].shape == (4, SEQ)
    assert int(mb[0]["tokens"].max()) < tok.vocab_size
    assert mock.consumed_tokens_by_source(19) == {"mock": 20 * GBS * SEQ}
    assert mock.validation_micro_batches("mock", 1, 0, 1, 4)[0]["tokens"].shape == (4, SEQ)
    assert _fingerprint(mock, [0, 7], 0, 1, 4) == _fingerprint(
        _build(cache, tok, "--mock-data", iters=20), [0, 7], 0, 1, 4)
