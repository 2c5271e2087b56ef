"""SFT data (megatron_ext/posttrain/sft_data.py, tools/preprocess_chat_data.py): preprocessing
bytes and errors, the loss mask against an independent computation, packing against a real
Megatron model, batches by (step, rank), validation sets and the bundled sample."""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_tool

from megatron_ext.errors import DataConfigError
from megatron_ext.inference.chat import IM_END, IM_START

SEQ = 96
REPO = Path(__file__).resolve().parents[1]
CONTENTS = ["What does ls do?", "It lists directory contents.", "Что делает команда ls?",
            "ls 列出目录内容。", "Show the synopsis of cp.", "cp [OPTION]... SOURCE DEST",
            "\n\nWas macht der Befehl tar?", "tar - ein Archivierungsprogramm", ""]


def make_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    convs = []
    for i in range(n):
        m = [{"role": "system", "content": rng.choice(CONTENTS[:4])}] if i % 3 == 0 else []
        for _ in range(1 + (i % 4 == 3)):
            m += [{"role": "user", "content": rng.choice(CONTENTS)},
                  {"role": "assistant", "content": " ".join(rng.choices(CONTENTS, k=1 + i % 2))}]
        if i % 17 == 5:  # too long for SEQ: a counted skip
            m[-1]["content"] = " ".join(CONTENTS * 4)
        if i % 5 == 0:
            m.append({"role": "user", "content": "trailing question"})
        convs.append(m)
    return convs


def write_jsonl(path, convs, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for m in convs:
            f.write(json.dumps({"messages": m}, ensure_ascii=False) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A toy Qwen3-style HF tokenizer directory, a chat file and its preprocessed prefix."""
    from test_chat import toy_qwen_tokenizer

    from megatron_ext.data.tokenizer import build_tokenizer
    from megatron_ext.inference.chat import ChatTokenizer
    from megatron_ext.posttrain.sft_data import preprocess_chat

    root = tmp_path_factory.mktemp("sft")
    hf = toy_qwen_tokenizer()
    hf.save_pretrained(str(root / "tok"))
    tok_args = dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(root / "tok"))
    convs = make_conversations(120)
    write_jsonl(root / "chat.jsonl", convs)
    stats = preprocess_chat([root / "chat.jsonl"], str(root / "w1"), max_length=SEQ, workers=1,
                            progress=False, chunk_bytes=2048, **tok_args)
    megatron_tok = build_tokenizer(**tok_args)
    return dict(root=root, hf=hf, convs=convs, stats=stats, tok_args=tok_args,
                megatron_tok=megatron_tok, chat=ChatTokenizer.from_megatron(megatron_tok))


def kept(env) -> list[list[dict]]:
    """The conversations the prefix holds (those of at most SEQ tokens), in order."""
    from megatron_ext.inference.chat import render_conversation

    return [m for m in env["convs"] if len(render_conversation(m, env["chat"])[0]) <= SEQ]


def sft_args(*argv):
    from megatron_ext.posttrain.sft_data import add_sft_data_args

    return add_sft_data_args(argparse.ArgumentParser()).parse_args(list(argv))


def build(env, *argv, gbs=4, seq=SEQ, iters=20, seed=3, **kw):
    from megatron_ext.posttrain.sft_data import build_sft_data

    args = sft_args("--data-path", str(env["root"] / "w1"), *argv)
    return build_sft_data(args, env["megatron_tok"], global_batch_size=gbs, seq_length=seq,
                          train_iters=iters, seed=seed, **kw)


# ---------------------------------------------------------------- preprocessing
def test_preprocessing_is_byte_identical_for_any_worker_count(env):
    from megatron_ext.posttrain.sft_data import INFO, LOSS_MASK, TOKENS, preprocess_chat

    root, stats = env["root"], env["stats"]
    two = preprocess_chat([root / "chat.jsonl"], str(root / "w2"), max_length=SEQ, workers=2,
                          progress=False, chunk_bytes=2048, **env["tok_args"])
    assert stats.conversations == two.conversations == len(kept(env))
    assert 0 < len(stats.skipped_long) == len(env["convs"]) - stats.conversations  # counted skips
    for suffix in (f"{TOKENS}.bin", f"{TOKENS}.idx", f"{LOSS_MASK}.bin", f"{LOSS_MASK}.idx", INFO):
        assert (root / f"w1{suffix}").read_bytes() == (root / f"w2{suffix}").read_bytes(), suffix
    info = json.loads((root / f"w1{INFO}").read_text())
    assert info["skipped_over_max_length"] == len(stats.skipped_long)
    assert info["tokens"] == stats.tokens and info["loss_mask_tokens"] == stats.loss_mask_tokens


@pytest.mark.parametrize("bad,reason", [
    ('{"messages": [{"role": "user", "content": "x"}', "invalid JSON"),
    ('{"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}', "no 'role'"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]}',
     "no assistant turn"),
])
def test_bad_chat_data_stops_with_file_and_line(env, tmp_path, capsys, bad, reason):
    tool = load_tool("preprocess_chat_data")

    path = tmp_path / "bad.jsonl"
    write_jsonl(path, env["convs"][:30], [bad])
    argv = ["--input", str(path), "--output-prefix", str(tmp_path / "out"), "--no-progress",
            "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", env["tok_args"]["tokenizer_model"]]
    assert tool.main(argv + ["--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}:31: ") and reason in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # nothing half-written


def test_over_long_conversations_are_counted_skips(env, tmp_path, capsys):
    tool = load_tool("preprocess_chat_data")

    path = tmp_path / "long.jsonl"
    long = [{"role": "user", "content": "x " * 2000}, {"role": "assistant", "content": "y"}]
    write_jsonl(path, env["convs"][:3] + [long] + env["convs"][3:6])
    argv = ["--input", str(path), "--output-prefix", str(tmp_path / "out"), "--no-progress",
            "--max-length", "1000", "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", env["tok_args"]["tokenizer_model"]]
    assert tool.main(argv) == 0
    out = capsys.readouterr()
    assert f"skipped {path}:4 (" in out.err and "skipped 1 over --max-length" in out.out
    assert json.loads((tmp_path / "out_chat.json").read_text())["conversations"] == 6
    assert tool.main(argv[:-4] + ["--max-length", "5", "--overwrite"] + argv[-4:]) == 2
    assert "no conversation to write (7 longer than --max-length 5)" in capsys.readouterr().err
    assert json.loads((tmp_path / "out_chat.json").read_text())["conversations"] == 6  # kept


def _chat_tool_error(env, capsys, inputs, prefix, *extra) -> tuple[int, list[str]]:
    argv = ["--input", *map(str, inputs), "--output-prefix", str(prefix), "--no-progress",
            "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", env["tok_args"]["tokenizer_model"], *extra]
    code = load_tool("preprocess_chat_data").main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_lone_surrogate_is_one_line_naming_file_and_line(env, tmp_path, capsys, workers):
    """JSON's "\\ud800" escape decodes to a lone surrogate no tokenizer takes: one line naming
    FILE:LINE and the message, with one worker or a pool (was a traceback)."""
    path = tmp_path / "chat.jsonl"
    bad = json.dumps({"messages": [{"role": "user", "content": "ls \ud800 -l"},
                                   {"role": "assistant", "content": "y"}]})
    assert "\\ud800" in bad
    write_jsonl(path, env["convs"][:5], [bad])
    code, err = _chat_tool_error(env, capsys, [path], tmp_path / "out", "--workers", workers)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {path}:6: message 0 (user) content has a lone surrogate "
                             "'\\ud800' at character 3; expected valid Unicode text"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]


def test_directory_input_and_existing_output_are_refused(env, tmp_path, capsys):
    """A directory as --input is named as one (was "no such file"); an existing output prefix
    is kept unless --overwrite (was replaced silently)."""
    code, err = _chat_tool_error(env, capsys, [tmp_path], tmp_path / "out")
    assert code == 2 and err == [f"error: --input {tmp_path} is a directory; expected a JSON-lines "
                                 "file (.jsonl or .jsonl.gz)"], err
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, env["convs"][:6])
    assert _chat_tool_error(env, capsys, [path], tmp_path / "out")[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    write_jsonl(path, env["convs"][6:8])
    code, err = _chat_tool_error(env, capsys, [path], tmp_path / "out")
    assert code == 2 and err == [f"error: --output-prefix {tmp_path / 'out'}: "
                                 f"{tmp_path / 'out'}_tokens_document.bin exists; pass --overwrite "
                                 "to replace it"], err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "chat.jsonl"} == {
        k: v for k, v in before.items() if k != "chat.jsonl"}
    assert _chat_tool_error(env, capsys, [path], tmp_path / "out", "--overwrite")[0] == 0
    assert json.loads((tmp_path / "out_chat.json").read_text())["conversations"] == 2


def test_no_fitting_conversation_names_the_real_shortest(env):
    """Was "the shortest has 0 tokens" whatever the data (min with initial=0)."""
    from megatron_ext.posttrain.sft_data import ChatSource

    shortest = int(ChatSource(str(env["root"] / "w1"), "test", env["chat"]).lengths.min())
    assert shortest > 2
    with pytest.raises(DataConfigError, match=rf"no training conversation fits --seq-length "
                                              rf"{shortest - 1} \(the shortest has {shortest} tokens\)$"):
        build(env, "--split", "100,0,0", seq=shortest - 1)


# ---------------------------------------------------------------- the loss mask
def per_position_loss(batch, logits):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                             reduction="none").view(batch["labels"].shape)


def test_loss_mask_equals_independent_assistant_targets(env):
    """The batch's masked mean cross-entropy equals a plain PyTorch mean over the assistant
    targets found from character spans of the rendered text (test_chat.expected_mask)."""
    from test_chat import expected_mask

    convs = kept(env)
    data = build(env)
    torch.manual_seed(0)
    checked = 0
    for step in range(3):
        (batch,) = data.micro_batches(step, 0, 1, 4)
        logits = torch.randn(4, SEQ, len(env["hf"]))
        ours = (per_position_loss(batch, logits) * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        total, count = 0.0, 0
        for r, row in enumerate(data.batch_conversations(step)):
            off = 0
            for _, doc in row:
                ids, mask = expected_mask(convs[doc], env["hf"])
                ids_t = torch.tensor(ids)
                assert torch.equal(batch["tokens"][r, off:off + len(ids)], ids_t)
                for t in range(len(ids) - 1):
                    if mask[t + 1]:  # position t predicts an assistant token
                        total += torch.nn.functional.cross_entropy(logits[r, off + t], ids_t[t + 1]).item()
                        count += 1
                off += len(ids)
            assert not batch["loss_mask"][r, off - 1:].any()  # a conversation's end and padding
            checked += len(row)
        assert count == int(batch["loss_mask"].sum())
        assert abs(ours.item() - total / count) < 1e-5
    assert checked >= 12


def test_packed_batch_layout(env):
    data = build(env)
    (batch,) = data.micro_batches(0, 0, 1, 4)
    pad = env["chat"].pad_id
    assert batch["tokens"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32 and batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].shape == (4, 1, SEQ, SEQ) and batch["cu_seqlens"].dtype == torch.int32
    cu = batch["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == 4 * SEQ and all(b > a for a, b in zip(cu, cu[1:]))
    for r in range(4):
        segs = [(a - r * SEQ, b - r * SEQ) for a, b in zip(cu, cu[1:]) if r * SEQ <= a < (r + 1) * SEQ]
        mask = batch["attention_mask"][r, 0]
        assert not mask.all(dim=-1).any()  # no row is all masked
        for a, b in segs:
            assert batch["position_ids"][r, a:b].tolist() == list(range(b - a))  # restart per segment
            block = ~mask[a:b, a:b]
            assert torch.equal(block, torch.ones(b - a, b - a, dtype=torch.bool).tril())  # causal inside
            assert mask[a:b, :a].all() and mask[a:b, b:].all()  # nothing across segments
        n_conv = len(data.batch_conversations(0)[r])
        assert len(segs) in (n_conv, n_conv + 1)
        if len(segs) > n_conv:  # trailing padding: pad tokens, no targets
            a, b = segs[-1]
            assert (batch["tokens"][r, a:b] == pad).all() and not batch["loss_mask"][r, a - 1:].any()
    assert data.packing_stats(3)["conversations_per_row"] > 1.5
    (lean,) = build(env, attention_mask=False).micro_batches(0, 0, 1, 4)  # TE's path: no dense mask
    assert "attention_mask" not in lean and torch.equal(lean["cu_seqlens"], batch["cu_seqlens"])


# ---------------------------------------------------------------- a real Megatron model
@pytest.fixture(scope="module")
def tiny_models(megatron_single_rank):
    from megatron_ext.model import build_model, marco_config
    from megatron_ext.presets import get_preset

    models = {}
    for name in ("tiny", "tiny-dense"):
        preset = get_preset(name)
        torch.manual_seed(7)
        models[name] = build_model(preset, marco_config(preset), "sequential").float()
    return models


def model_losses(model, batch):
    """Per-position losses [b, s] of a Megatron GPTModel on a batch dict."""
    return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                 labels=batch["labels"]).float()


def test_packed_loss_equals_unpacked_per_conversation_loss(env, tiny_models, fresh_moe_tracker):
    packed, unpacked = build(env, gbs=2), build(env, "--no-sft-pack", gbs=2)
    convs = [c for row in packed.batch_conversations(0) for c in row]
    assert len(convs) >= 4
    (pb,) = packed.micro_batches(0, 0, 1, 2)
    from megatron_ext.posttrain.sft_data import assemble, collate

    rows = [assemble([packed.sources[0].get(d)], SEQ, env["chat"].pad_id, False) for _, d in convs]
    ub = collate(rows, SEQ, False)
    assert "attention_mask" not in ub and "attention_mask" not in unpacked.micro_batches(0, 0, 1, 2)[0]
    for name, model in tiny_models.items():
        model.eval()
        with torch.no_grad():
            lp, lu = model_losses(model, pb), model_losses(model, ub)
        packed_loss = (lp * pb["loss_mask"]).sum() / pb["loss_mask"].sum()
        unpacked_loss = (lu * ub["loss_mask"]).sum() / ub["loss_mask"].sum()
        assert pb["loss_mask"].sum() == ub["loss_mask"].sum()
        assert abs(packed_loss.item() - unpacked_loss.item()) < 1e-6, name
        # position by position too: each target's loss is what the conversation alone gives
        assert torch.allclose(lp[pb["loss_mask"] > 0], lu[ub["loss_mask"] > 0], atol=2e-5), name


def test_padding_and_trailing_tokens_change_no_loss_or_gradient(env, tiny_models):
    from megatron_ext.inference.chat import render_conversation
    from megatron_ext.posttrain.sft_data import assemble, collate

    model = tiny_models["tiny-dense"]
    model.train()
    chat, conv = env["chat"], kept(env)[1]
    extra = conv + [{"role": "user", "content": "Und tar?"}]

    def row(messages, pad):
        ids, mask = render_conversation(messages, chat)
        return assemble([(np.asarray(ids), np.asarray(mask, dtype=np.float32))], SEQ, pad, True)

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        lp = model_losses(model, batch)
        loss = (lp * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref = loss_and_grads(collate([row(conv, chat.pad_id)], SEQ, True))
    for variant in (row(conv, 17), row(extra, chat.pad_id)):  # other padding; a trailing user turn
        loss, grads = loss_and_grads(collate([variant], SEQ, True))
        assert abs(loss - ref[0]) < 1e-7
        assert len(grads) == len(ref[1])
        assert all(torch.allclose(a, b, atol=1e-8) for a, b in zip(grads, ref[1]))


# ---------------------------------------------------------------- batches by step and rank
def test_batches_are_a_pure_function_of_step_and_rank(env):
    a, b = build(env, gbs=4), build(env, gbs=4)
    late = b.micro_batches(9, 1, 2, 1)  # a fresh plan asked for step 9 first (a resumed run)
    for step in range(10):
        full = a.micro_batches(step, 0, 1, 2)
        ranks = [a.micro_batches(step, r, 2, 1) for r in range(2)]
        rows = torch.cat([mb["tokens"] for mb in full])
        # micro-batch m of rank r holds rows m*mbs*dp + r*mbs ... (Megatron's sampler layout)
        assert torch.equal(rows, torch.cat([ranks[0][0]["tokens"], ranks[1][0]["tokens"],
                                            ranks[0][1]["tokens"], ranks[1][1]["tokens"]]))
    for x, y in zip(late, a.micro_batches(9, 1, 2, 1)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    other = build(env, gbs=4, seed=4)
    assert not torch.equal(other.micro_batches(0, 0, 1, 4)[0]["tokens"],
                           a.micro_batches(0, 0, 1, 4)[0]["tokens"])
    used = a.consumed_tokens_by_source(9)
    assert list(used) == ["w1"] and used["w1"] == sum(
        int(a.sources[0].lengths[d]) for s in range(10) for row in a.batch_conversations(s) for _, d in row)
    # the stream draws every training conversation once per epoch, in a new order each epoch
    from megatron_ext.posttrain.sft_data import _Stream

    stream, docs = _Stream(a.train_docs, [1.0], seed=3), a.train_docs[0].tolist()
    epochs = [[stream.next()[1] for _ in docs] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == docs and epochs[0] != epochs[1] != docs


def test_validation_split_covers_held_out_conversations_once(env):
    data = build(env, "--split", "80,20,0", "--sft-max-conversations", "2")
    assert data.validation_names() == ["w1"]
    src, rows = data.validation["w1"]
    held = sorted(d for r in rows for d in r)
    assert not set(held) & set(data.train_docs[0].tolist()) and len(held) == round(0.2 * len(src))
    assert max(len(r) for r in rows) <= 2
    assert max(len(r) for s in range(5) for r in data.batch_conversations(s)) <= 2
    n = -(-data.validation_rows("w1") // 2) + 1  # one micro-batch past the end: all padding
    first = data.validation_micro_batches("w1", n, 0, 1, 2)
    targets = sum(int(src.get(d)[1][1:].sum()) for d in held)
    assert sum(int(mb["loss_mask"].sum()) for mb in first) == targets
    again = data.validation_micro_batches("w1", n, 0, 1, 2)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(first, again))
    assert not first[-1]["loss_mask"].any()


def test_weighted_blend_and_tokenizer_mismatch(env, tmp_path):
    from megatron_ext.data.tokenizer import build_tokenizer
    from megatron_ext.posttrain.sft_data import build_sft_data

    root = env["root"]
    args = sft_args("--data-path", "3", str(root / "w1"), "1", str(root / "w2_tokens_document"),
                    "--valid-data-path", str(root / "w2"))
    data = build_sft_data(args, env["megatron_tok"], global_batch_size=8, seq_length=SEQ,
                          train_iters=30, seed=1)
    names = [s.name for s in data.sources]
    assert len(set(names)) == 2 and data.validation_names() == ["w2"]
    used = data.consumed_tokens_by_source(29)
    share = used[names[0]] / sum(used.values())
    assert 0.7 < share < 0.8  # 3:1 by conversations
    spm = build_tokenizer("SentencePieceTokenizer", None)
    with pytest.raises(DataConfigError, match=r"--data-path .*w1: tokenized with .* but training uses"):
        build_sft_data(sft_args("--data-path", str(root / "w1")), spm, global_batch_size=4,
                       seq_length=SEQ, train_iters=2, seed=1)
    with pytest.raises(DataConfigError, match="no .*_chat.json"):
        build_sft_data(sft_args("--data-path", str(tmp_path / "nothing")), env["megatron_tok"],
                       global_batch_size=4, seq_length=SEQ, train_iters=2, seed=1)
    with pytest.raises(DataConfigError, match="no training conversation fits --seq-length 8"):
        build(env, seq=8)


# ---------------------------------------------------------------- the bundled sample
def test_bundled_sample_trains_with_no_data_flag(tmp_path, monkeypatch):
    from megatron_ext.data.tokenizer import build_tokenizer
    from megatron_ext.posttrain.sft_data import SAMPLE_DIR, build_sft_data, prepare_sft_sample

    manifest = json.loads((SAMPLE_DIR / "manifest.json").read_text())
    assert len(manifest["languages"]) == 19 and manifest["conversations"]["valid"] > 0
    assert sum((SAMPLE_DIR / f"{s}.jsonl.gz").stat().st_size for s in ("train", "valid")) < 3e6
    monkeypatch.setenv("MARCO_CACHE", str(tmp_path))
    data = build_sft_data(sft_args(), build_tokenizer(), global_batch_size=8, seq_length=256,
                          train_iters=5, seed=0)
    info = prepare_sft_sample(None)  # cached: the same prefixes
    assert info["conversations"] == manifest["conversations"]
    assert data.validation_names() == ["sft_valid"] and data.sources[0].prefix == info["train"]
    (batch,) = data.micro_batches(4, 0, 1, 8)
    assert batch["loss_mask"].sum() > 0 and batch["tokens"].max() < 8192
    text = "\n".join(data.summary())
    assert "sft_train: 30" in text and "packed" in text and "sft_valid" in text
    ims = (batch["tokens"] == build_tokenizer().tokenize(IM_START)[0]).sum()
    assert ims >= (batch["tokens"] == build_tokenizer().tokenize(IM_END)[0]).sum() // 2 > 0


def _worker_catches_sigterm(raw, where) -> int:
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    return int(status.split("SigCgt:")[1].split()[0], 16) >> (signal.SIGTERM - 1) & 1


def _no_init() -> None:
    pass


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_pool_workers_do_not_inherit_a_sigterm_handler(tmp_path):
    """A process that trained holds the trainer's save-and-stop SIGTERM handler; forked pool
    workers inherited it, so Pool.terminate() (after a bad line) could not stop a worker and the
    tool hung in join() (one CI run). Workers must start with the default handler."""
    from megatron_ext.data import jsonl

    path = tmp_path / "in.jsonl"
    path.write_text("{}\n" * 40)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # as the trainer's StopSignal
    try:
        with jsonl.encoded_lines([str(path)], _worker_catches_sigterm, _no_init, (), workers=2,
                                 chunk_bytes=16, progress=False) as lines:
            caught = [line[3] for line in lines]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(caught) == 40 and set(caught) == {0}
