"""On-policy distillation (megatron_ext/posttrain/{opd,losses,rollout,teachers}.py).

- Each loss against an independent plain formula (float64 probabilities, SciPy's
  Jensen-Shannon distance): reverse and forward KL, generalised JSD at beta 0, 0.5 and 1;
  chunked and unchunked values and gradients agree; logits are cut to the real vocabulary.
- The sampled-rkl gradient equals the full reverse-KL gradient in expectation: Monte Carlo
  over 200,000 samples per position, every coordinate within 5 standard errors.
- Masks: prompt tokens, padding and anything outside the response carry neither loss nor
  gradient; a response ends at (and includes) its stop token.
- Teachers: a random qwen3_moe of Qwen3-30B-A3B's shape (untied embeddings, 128 experts, top-8,
  4 KV heads) goes through tools/import_hf_to_mcore.py; as a Megatron teacher it scores what
  transformers scores (and a dense qwen3 likewise), so an HF teacher and the same weights as a
  Megatron teacher give the same loss. A teacher with another token map is refused before the
  first step, in one line naming both tokenizers.
- The trainer (posttrain_marco.py opd, in-process): a two-phase cascade (Megatron MoE teacher,
  then an HF teacher with the jsd loss as a phase override) resumed after every step (inside
  phase 1, at the phase switch, inside phase 2) trains exactly what an uninterrupted run
  trains; the same run at EP=2 (two processes, each sampling its own rows) and at TP=2
  (vocab-parallel losses) equals one process (one torchrun launch; this file is its worker).
- A served teacher (tools/serve_teacher.py, SGLang's protocol) scores what the in-process
  teacher scores. The SGLang rollout engine (tools/serve_teacher.py serving the student, its
  weights synced from disk every step) rolls out and trains as the in-process generator; an
  engine on old weights, or misbehaving, or hung under SIGTERM, stops the run untrained; Marco's
  cascade files and slurm/{nano,mini}_opd.sbatch give the published settings.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, _free_port, load_tool, subprocess_env

from megatron_ext.errors import ConfigError, MarcoError
from megatron_ext.posttrain import losses

VOCAB = 8192  # the bundled SentencePiece tokenizer's


# ====================================================================== losses
def _reference(s_logits, t_logits, kind, beta=0.5):
    """Independent float64 formulas on probabilities."""
    p, q = torch.softmax(s_logits.double(), -1), torch.softmax(t_logits.double(), -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "rkl":
        return kl(p, q)
    if kind == "fkl":
        return kl(q, p)
    if beta == 0:
        return kl(q, p)
    if beta == 1:
        return kl(p, q)
    m = beta * q + (1 - beta) * p
    return beta * kl(q, m) + (1 - beta) * kl(p, m)


@pytest.mark.parametrize("kind,beta", [("rkl", 0.5), ("fkl", 0.5), ("jsd", 0.0), ("jsd", 0.5),
                                       ("jsd", 1.0), ("jsd", 0.3)])
def test_divergence_equals_plain_formula(kind, beta):
    from scipy.spatial.distance import jensenshannon

    g = torch.Generator().manual_seed(0)
    n, v, pad = 9, 17, 5  # logits padded by 5 columns the tokenizer does not have
    s = (2 * torch.randn(n, v + pad, generator=g)).requires_grad_()
    t = 2 * torch.randn(n, v + pad, generator=g)
    t[:, v:] = 50.0  # huge padded logits: must not matter
    temperature = 0.7
    ref_in = s.detach()[:, :v].clone().requires_grad_()
    expected = _reference(ref_in / temperature, t[:, :v] / temperature, kind, beta)
    got = losses.full_vocab_divergence(s, t, opd_loss=kind, beta=beta, temperature=temperature,
                                       vocab_size=v, chunk_tokens=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    if kind == "jsd" and beta == 0.5:  # SciPy: distance = sqrt(JSD) with natural logs
        p = torch.softmax(s.detach()[:, :v].double() / temperature, -1).numpy()
        q = torch.softmax(t[:, :v].double() / temperature, -1).numpy()
        scipy_jsd = torch.tensor([jensenshannon(a, b) ** 2 for a, b in zip(p, q)])
        torch.testing.assert_close(got.double(), scipy_jsd, atol=1e-6, rtol=1e-5)
    # Gradients: the checkpointed chunks give the reference's gradient, padded columns none.
    (grad,) = torch.autograd.grad(got.sum(), s)
    (ref_grad,) = torch.autograd.grad(expected.sum(), ref_in)
    torch.testing.assert_close(grad[:, :v].double(), ref_grad.double(), atol=1e-6, rtol=1e-5)
    assert grad[:, v:].abs().max() == 0
    # A subset of rows, in one chunk or many: the same values.
    rows = torch.tensor([7, 1, 4])
    for chunk in (1, 2, 100):
        sub = losses.full_vocab_divergence(s, t, opd_loss=kind, beta=beta, temperature=temperature,
                                           vocab_size=v, rows=rows, chunk_tokens=chunk)
        torch.testing.assert_close(sub, got[rows].detach(), atol=1e-7, rtol=1e-6)


def test_token_logprobs_cut_the_padded_vocabulary():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 10, generator=g)
    logits[..., 8:] = 30.0
    targets = torch.randint(0, 8, (3, 4), generator=g)
    got = losses.token_logprobs(logits, targets, temperature=2.0, vocab_size=8)
    expected = torch.log_softmax(logits[..., :8].double() / 2.0, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)
    # Chunked (checkpointed) over a subset of tokens: the same values and gradients.
    rows = torch.tensor([9, 0, 5, 11, 2])
    x = logits.clone().requires_grad_()
    for chunk in (1, 2, 64):
        sub = losses.selected_logprobs(x, targets, rows, temperature=2.0, vocab_size=8,
                                       chunk_tokens=chunk)
        torch.testing.assert_close(sub.double(), expected.reshape(-1)[rows], atol=1e-6, rtol=1e-6)
        (grad,) = torch.autograd.grad(sub.sum(), x)
        whole = losses.token_logprobs(x, targets, temperature=2.0, vocab_size=8).reshape(-1)[rows]
        (want,) = torch.autograd.grad(whole.sum(), x)
        torch.testing.assert_close(grad, want, atol=1e-7, rtol=1e-6)


def test_sampled_rkl_gradient_matches_reverse_kl_gradient_in_expectation():
    """E_{y~p}[grad of the sampled loss] = grad KL(p || q) per position; tolerance: every
    coordinate within 5 standard errors of the Monte Carlo mean (and 5% of the largest)."""
    g = torch.Generator().manual_seed(3)
    positions, v, k = 3, 12, 200_000
    z = torch.randn(positions, v, generator=g, dtype=torch.float64).float().requires_grad_()
    t = torch.log_softmax(torch.randn(positions, v, generator=g), -1)
    full = losses.divergence(torch.log_softmax(z, -1), t, "rkl").sum()
    (exact,) = torch.autograd.grad(full, z)

    p = torch.softmax(z.detach(), -1)
    y = torch.multinomial(p, k, replacement=True, generator=g)  # [positions, k]
    s_y = losses.token_logprobs(z.unsqueeze(1).expand(positions, k, v), y)
    t_y = t.gather(-1, y)
    loss = losses.sampled_rkl(s_y, t_y, kl_coef=1.0).mean(dim=1).sum()
    # The loss value is the sampled reverse-KL estimate, whose mean is KL(p || q).
    assert abs(loss.item() - full.item()) < 0.05 * full.item()
    (estimate,) = torch.autograd.grad(loss, z)
    per_sample = (s_y - t_y).detach()[..., None] * (torch.nn.functional.one_hot(y, v) - p[:, None])
    stderr = per_sample.std(dim=1) / math.sqrt(k)
    gap = (estimate - exact).abs()
    assert (gap <= 5 * stderr + 1e-7).all(), (gap / stderr).max()
    assert gap.max() < 0.05 * exact.abs().max()


def _fake_task(loss: str, vocab: int, kl_coef: float = 1.0, beta: float = 0.5, temperature=1.0):
    from megatron_ext.posttrain.opd import OPDTask, PhaseSettings
    from megatron_ext.posttrain.rollout import RolloutSettings

    task = OPDTask.__new__(OPDTask)
    task.settings = PhaseSettings(RolloutSettings(temperature=temperature), loss, kl_coef, beta)
    task.tok = type("Tok", (), {"vocab_size": vocab})()
    task.tp = 1
    task.opts = type("Opts", (), {"chunk_tokens": 3})()
    return task


def _samples():
    from megatron_ext.posttrain.rollout import Sample

    stop = 9
    return [Sample(0, [1, 2, 3, 4, 5], [6, 7, stop], [-1.0, -2.0, -0.5], "stop"),
            Sample(1, [1, 2], [8, 6, 7, 6], [-0.1, -0.2, -0.3, -0.4], "length")]


@pytest.mark.parametrize("loss", ["sampled-rkl", "rkl", "jsd"])
def test_prompt_padding_and_nothing_outside_the_response_carry_loss(loss):
    from megatron_ext.posttrain.rollout import collate

    v = 12
    batch = collate(_samples(), pad_id=0, multiple=4)
    assert batch["tokens"].shape == (2, 8)  # 8 tokens, already a multiple of 4
    # labels[t] = tokens[t + 1]; the mask is on exactly the response tokens (stop included).
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["labels"][0, 4:7].tolist() == [6, 7, 9] and batch["labels"][1, 1:5].tolist() == [8, 6, 7, 6]
    assert batch["rollout_logprobs"][0, 4:7].tolist() == [-1.0, -2.0, -0.5]
    g = torch.Generator().manual_seed(0)
    batch["teacher_logprobs"] = -torch.rand(2, 8, generator=g)
    teacher_logits = torch.randn(2, 8, v, generator=g)
    task = _fake_task(loss, v)
    teacher = None if loss == "sampled-rkl" else (teacher_logits, False)
    logits = torch.randn(2, 8, v, generator=g, requires_grad=True)
    total, tokens, reports = task._loss(batch, teacher, logits)
    assert int(tokens) == 7 and reports["opd loss"][1].item() == 7
    (grad,) = torch.autograd.grad(total, logits)
    outside = batch["loss_mask"] == 0
    assert grad[outside].abs().max() == 0 and grad[~outside].abs().max() > 0
    # Anything outside the response (prompt, padding, teacher values there) changes nothing.
    other = dict(batch, teacher_logprobs=batch["teacher_logprobs"].masked_fill(outside, 5.0))
    moved = logits.detach().masked_fill(outside[..., None], 7.0)
    t2 = None if teacher is None else (teacher_logits.masked_fill(outside[..., None], -3.0), False)
    again = task._loss(other, t2, moved)[0]
    torch.testing.assert_close(again, total.detach())
    # Values: sampled-rkl is the sampled reverse KL; the full-vocabulary ones their divergence.
    rows = (~outside).reshape(-1).nonzero().squeeze(-1)
    s = torch.log_softmax(logits.detach(), -1).reshape(-1, v)[rows]
    s_y = s.gather(-1, batch["labels"].reshape(-1)[rows, None])[:, 0]
    if loss == "sampled-rkl":
        expected = (s_y - batch["teacher_logprobs"].reshape(-1)[rows]).sum()
    else:
        t = teacher_logits.reshape(-1, v)[rows]
        expected = _reference(logits.detach().reshape(-1, v)[rows], t, loss if loss != "jsd" else "jsd").sum()
    torch.testing.assert_close(total.detach().double(), expected.double(), atol=1e-5, rtol=1e-5)
    assert reports["logprob diff"][0].item() == pytest.approx(
        (s_y - batch["rollout_logprobs"].reshape(-1)[rows]).abs().sum().item(), rel=1e-5)


# ====================================================================== teachers and the cascade
@pytest.fixture(scope="module")
def teachers(tmp_path_factory, megatron_single_rank):
    """A student (small qwen3_moe, imported) and two teachers, each as HF directory + import:
    `moe30b` has Qwen3-30B-A3B's shape at toy width (untied embeddings, 128 experts x 16,
    top-8, 8 query / 4 KV heads), `dense` a qwen3. Every HF directory carries the bundled
    tokenizer exported to Hugging Face (the same token map as the student's)."""
    from helpers_hf import make_dense_qwen3, make_moe_qwen3
    from test_export import IMPORT

    from megatron_ext.convert.tokenizer_export import sentencepiece_to_hf

    root = tmp_path_factory.mktemp("opd")
    tok = root / "tokenizer"
    sentencepiece_to_hf(str(REPO / "data/tokenizer/marco_tiny_spm.model"), str(tok))
    out = {"root": root, "tokenizer": tok}
    makers = {
        "student": lambda d: make_moe_qwen3(d, seed=1, vocab_size=VOCAB, num_experts=8,
                                            num_experts_per_tok=2),
        "moe30b": lambda d: make_moe_qwen3(d, seed=2, vocab_size=VOCAB, hidden_size=64,
                                           num_attention_heads=8, num_key_value_heads=4,
                                           head_dim=16, num_experts=128, num_experts_per_tok=8,
                                           moe_intermediate_size=16, tie_word_embeddings=False),
        "dense": lambda d: make_dense_qwen3(d, seed=3, vocab_size=VOCAB, tie_word_embeddings=False),
    }
    for name, make in makers.items():
        hf, ckpt = root / f"{name}-hf", root / f"{name}-mcore"
        out[f"{name}-model"] = make(str(hf))
        if name != "student":
            for f in tok.iterdir():
                shutil.copy(f, hf / f.name)
        assert IMPORT.main(["--hf-dir", str(hf), "--save", str(ckpt)]) == 0
        out[name] = (str(hf), str(ckpt))
    return out


def _rows(vocab=VOCAB, seed=0):
    from megatron_ext.posttrain.rollout import Sample, collate

    g = torch.Generator().manual_seed(seed)
    samples = [Sample(i, torch.randint(0, vocab, (n,), generator=g).tolist(),
                      torch.randint(0, vocab, (m,), generator=g).tolist(), [0.0] * m, "length")
               for i, (n, m) in enumerate([(7, 5), (3, 9), (11, 2)])]
    return collate(samples, pad_id=3)


@pytest.mark.parametrize("name", ["moe30b", "dense"])
def test_hf_teacher_and_its_import_as_megatron_teacher_give_the_same_loss(teachers, name,
                                                                          fresh_moe_tracker):
    from megatron_ext.config import ModelOptions
    from megatron_ext.inference.chat import ChatTokenizer
    from megatron_ext.posttrain.teachers import TeacherSpec, load_teacher

    hf_dir, ckpt = teachers[name]
    if name == "moe30b":  # the importer took the 30B-A3B shape as it is
        from megatron_ext import checkpointing

        preset = checkpointing.preset_from_checkpoint(ckpt)
        assert (preset.num_experts, preset.moe_router_topk, preset.num_query_groups,
                preset.num_attention_heads, preset.tie_embeddings) == (128, 8, 4, 8, False)
    student_tok = ChatTokenizer.from_args("SentencePieceTokenizer", None)
    kw = dict(student_tokenizer=student_tok, options=ModelOptions(), seq_length=64)
    mcore = load_teacher(TeacherSpec(ckpt, "megatron"), **kw)
    hf = load_teacher(TeacherSpec(hf_dir, "hf"), **kw)
    batch = _rows()
    args = (batch["tokens"], batch["position_ids"], batch["lengths"])
    lp = [t.token_logprobs(*args, batch["labels"], temperature=0.8, vocab_size=VOCAB)
          for t in (mcore, hf)]
    mask = batch["loss_mask"] > 0
    torch.testing.assert_close(lp[0][mask], lp[1][mask], atol=2e-5, rtol=1e-5)
    # The same losses with either teacher (sampled-rkl from log-probs, jsd from full logits).
    g = torch.Generator().manual_seed(5)
    student = torch.randn(*batch["tokens"].shape, VOCAB, generator=g)
    for loss in ("sampled-rkl", "jsd"):
        task = _fake_task(loss, VOCAB, temperature=0.8)
        values = []
        for teacher, t_lp in zip((mcore, hf), lp):
            b = dict(batch, teacher_logprobs=t_lp)
            full = None if loss == "sampled-rkl" else teacher.logits(*args)
            values.append(task._loss(b, full, student)[0].item())
        assert values[0] == pytest.approx(values[1], rel=1e-5, abs=1e-5), (loss, values)


def test_served_teacher_scores_what_the_in_process_teacher_scores(teachers):
    """tools/serve_teacher.py in a thread, scored through SGLang's native /generate
    (max_new_tokens 0): the served teacher's log-probs are the HF model's, at temperature 1
    (SGLang scores prompt tokens at T = 1; another temperature is refused)."""
    import threading

    from megatron_ext.config import ModelOptions
    from megatron_ext.inference.chat import ChatTokenizer
    from megatron_ext.posttrain.teachers import TeacherSpec, load_teacher

    serve = load_tool("serve_teacher")
    server = serve.make_server(serve.Model(teachers["dense"][0], dtype="fp32", batch_size=2),
                               "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        student_tok = ChatTokenizer.from_args("SentencePieceTokenizer", None)
        kw = dict(student_tokenizer=student_tok, options=ModelOptions(), seq_length=64)
        url = f"sglang:http://127.0.0.1:{server.server_address[1]}"
        remote = load_teacher(TeacherSpec(url, "sglang"), **kw)  # token map: /get_model_info
        local = load_teacher(TeacherSpec(teachers["dense"][0], "hf"), **kw)
        batch = _rows(seed=4)
        args = (batch["tokens"], batch["position_ids"], batch["lengths"], batch["labels"])
        got, want = (t.token_logprobs(*args, temperature=1.0, vocab_size=VOCAB) for t in (remote, local))
        mask = batch["loss_mask"] > 0
        torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
        # The same sampled-rkl loss as with the in-process teacher.
        student = torch.randn(*batch["tokens"].shape, VOCAB, generator=torch.Generator().manual_seed(2))
        task = _fake_task("sampled-rkl", VOCAB)
        values = [task._loss(dict(batch, teacher_logprobs=lp), None, student)[0].item() for lp in (got, want)]
        assert values[0] == pytest.approx(values[1], rel=1e-5, abs=1e-5)
        with pytest.raises(ConfigError, match="per-token log-probs only"):
            remote.logits(*args[:3])
        with pytest.raises(ConfigError, match="temperature 1"):
            remote.token_logprobs(*args, temperature=0.7, vocab_size=VOCAB)
    finally:
        server.shutdown()
        server.server_close()


def test_a_teacher_with_another_token_map_is_refused_naming_both(teachers, tmp_path):
    from megatron_ext.inference.chat import ChatTokenizer
    from megatron_ext.posttrain.teachers import TeacherSpec, check_token_maps, teacher_tokenizer

    other = tmp_path / "other-tokenizer"
    shutil.copytree(teachers["tokenizer"], other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[500:502]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    student = ChatTokenizer.from_args("SentencePieceTokenizer", None)
    spec = TeacherSpec(teachers["dense"][0], "hf", tokenizer=str(other), name="dense")
    with pytest.raises(ConfigError) as e:
        check_token_maps(student, teacher_tokenizer(spec), spec.label)
    message = str(e.value)
    assert "\n" not in message and str(other) in message and "marco_tiny_spm.model" in message
    assert repr(a) in message or repr(b) in message
    # The same teacher with its own (equal) token map passes.
    check_token_maps(student, teacher_tokenizer(TeacherSpec(teachers["dense"][0], "hf")), "dense")
    # The trainer refuses before its first step.
    import posttrain_marco

    with pytest.raises(ConfigError, match="differ") as e:
        posttrain_marco.main(["opd", "--teacher", teachers["dense"][0], "--teacher-tokenizer",
                              str(other), "--train-iters", "1", "--load", teachers["student"][1],
                              "--rollout-batch-size", "1", "--micro-batch-size", "2"])
    assert str(other) in str(e.value)


def test_cascade_file_errors_name_file_and_phase(teachers, tmp_path, monkeypatch):
    from megatron_ext.posttrain.opd import load_cascade

    ckpt = teachers["dense"][1]

    def write(text):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        return str(path)

    monkeypatch.setenv("OPD_TEACHER", ckpt)
    c = load_cascade(write("settings: {rollout-batch-size: 3}\nphases:\n"
                           "  - name: a\n    teacher: ${OPD_TEACHER}\n    steps: 2\n    lr: 1e-3\n"
                           "  - {name: b, teacher: {path: '${OPD_TEACHER}'}, steps: 3,"
                           " overrides: {opd-loss: rkl}}\n"))
    assert [(p.name, p.start, p.steps, p.teacher.kind) for p in c.phases] == [
        ("a", 0, 2, "megatron"), ("b", 2, 3, "megatron")]
    assert [c.phase_index(s) for s in range(6)] == [0, 0, 1, 1, 1, 1]
    assert dict(c.settings) == {"rollout_batch_size": 3}
    for text, pattern in [
        ("phases: []\n", "non-empty 'phases'"),
        ("phases:\n  - {name: a, steps: 2}\n", "phase 1: no 'teacher'"),
        ("phases:\n  - {teacher: '${NOT_SET_OPD}', steps: 2}\n", "NOT_SET_OPD is not set"),
        ("phases:\n  - {teacher: /nonexistent/x, steps: 2}\n", "phase 1 teacher: teacher /nonexistent/x"),
        (f"phases:\n  - {{teacher: {ckpt}, steps: 0}}\n", "phase 1 steps: must be a positive"),
        (f"phases:\n  - {{teacher: {ckpt}, steps: 2, overrides: {{n-samples-per-prompt: 4}}}}\n",
         "'n-samples-per-prompt' cannot be set here"),
        (f"phases:\n  - {{teacher: {ckpt}, steps: 2, lrr: 1}}\n", "unknown key 'lrr'"),
    ]:
        with pytest.raises(ConfigError, match=pattern) as e:
            load_cascade(write(text))
        assert str(tmp_path / "c.yaml") in str(e.value) or "NOT_SET" in str(e.value)


def test_flags_are_resolved_from_the_cascade_and_checked(teachers, tmp_path):
    import posttrain_marco
    from megatron_ext.posttrain.opd import resolve_opd_args

    ckpt = teachers["dense"][1]
    path = tmp_path / "c.yaml"
    path.write_text(f"settings: {{rollout-batch-size: 3, n-samples-per-prompt: 2, "
                    f"rollout-max-response-len: 40}}\nphases:\n  - {{teacher: {ckpt}, steps: 5}}\n"
                    f"  - {{teacher: {ckpt}, steps: 4, overrides: {{rollout-max-response-len: 60}}}}\n")
    parse = posttrain_marco.build_parser().parse_args
    args = resolve_opd_args(parse(["opd", "--cascade", str(path), "--rollout-max-prompt-len", "100"]))
    assert (args.train_iters, args.global_batch_size, args.seq_length) == (9, 6, 160)
    assert args.rollout_batch_size == 3 and args.rollout_max_prompt_len == 100
    for extra, pattern in [(["--global-batch-size", "4"], "must divide --rollout-batch-size 3"),
                           (["--train-iters", "10"], "exceeds the cascade's 9 steps"),
                           (["--seq-length", "150"], "shorter than"),
                           (["--teacher", ckpt], "exclusive")]:
        with pytest.raises(ConfigError, match=pattern):
            resolve_opd_args(parse(["opd", "--cascade", str(path), "--rollout-max-prompt-len",
                                    "100", *extra]))


@pytest.mark.parametrize("model,phase2", [("nano", 1000), ("mini", 1900)])
def test_marco_recipes_and_sbatch_dry_runs(teachers, model, phase2, tmp_path):
    """configs/posttrain/marco_{model}_cascade.yaml carries the published settings, and
    slurm/{model}_opd.sbatch (dry run) prints an opd command these flags accept."""
    import shlex

    import posttrain_marco
    from megatron_ext.posttrain.opd import resolve_opd_args

    env = subprocess_env(QWEN3_30B_A3B_MCORE=teachers["moe30b"][1],
                         QWEN3_NEXT_80B_A3B="http://teacher-node:8000", MARCO_DRY_RUN="1",
                         MARCO_OUTPUT=str(tmp_path))
    run = subprocess.run(["bash", str(REPO / f"slurm/{model}_opd.sbatch")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    srun = shlex.split(run.stdout.strip().splitlines()[-1])
    argv = srun[srun.index("posttrain_marco.py") + 1:]
    with pytest.MonkeyPatch.context() as mp:
        for k in ("QWEN3_30B_A3B_MCORE", "QWEN3_NEXT_80B_A3B"):
            mp.setenv(k, env[k])
        args = resolve_opd_args(posttrain_marco.build_parser().parse_args(argv))
    c = args.opd_cascade
    assert [(p.steps, p.lr, p.teacher.kind) for p in c.phases] == [(1900, 1e-6, "megatron"),
                                                                   (phase2, 1e-6, "sglang")]
    assert (args.rollout_batch_size, args.n_samples_per_prompt, args.global_batch_size) == (512, 2, 1024)
    lengths = (args.rollout_max_prompt_len, args.rollout_max_response_len, args.seq_length)
    assert lengths == (2048, 8192, 10240)
    assert (args.rollout_temperature, args.rollout_top_p, args.opd_loss) == (1.0, 1.0, "sampled-rkl")
    assert (args.lr, args.lr_decay_style, args.train_iters) == (1e-6, "constant", 1900 + phase2)
    assert args.expert_model_parallel_size == 8 and args.load.endswith(f"{model}/sft")


# ====================================================================== the trainer
# The router's load-balancing and z-losses stay on: OPD rows are right-padded and the padding is
# kept out of both, so the sequence-parallel shards of TP=2 hold different token counts, the
# case where Megatron-Core < 0.19 (and Megatron-LM #5047's fix) scale them wrongly
# (mcore_fixes.moe_aux_loss_tp_scale).
COMMON = ["--micro-batch-size", "2", "--seed", "7", "--log-interval", "100", "--eval-interval", "2",
          "--eval-prompts", "4", "--rollout-max-prompt-len", "48", "--adam-eps", "1e-6"]


@pytest.fixture(scope="module")
def cascade(teachers):
    """Phase 1: the imported 30B-shape MoE as a Megatron teacher, sampled-rkl; phase 2: the
    dense model's HF directory, jsd (a phase override)."""
    path = teachers["root"] / "cascade.yaml"
    path.write_text(
        "settings: {rollout-batch-size: 2, n-samples-per-prompt: 2, rollout-max-response-len: 6}\n"
        "phases:\n"
        f"  - {{name: moe, teacher: {teachers['moe30b'][1]}, steps: 2, lr: 1.0e-3}}\n"
        f"  - {{name: dense, teacher: {teachers['dense'][0]}, steps: 2, lr: 5.0e-4,\n"
        "     overrides: {opd-loss: jsd, opd-beta: 0.5, rollout-temperature: 0.9}}\n")
    return str(path)


def _run_opd(*argv):
    import posttrain_marco

    assert posttrain_marco.main(["opd", *argv]) == 0


def _records(path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in open(path)]
    return ([r for r in records if "opd_loss" in r], [r for r in records if "heldout/reverse_kl" in r])


@pytest.fixture(scope="module")
def straight(teachers, cascade, fresh_module_tracker):
    log = teachers["root"] / "straight.jsonl"
    _run_opd("--cascade", cascade, "--load", teachers["student"][1], *COMMON, "--log-json", str(log))
    return _records(log)


@pytest.fixture(scope="module")
def fresh_module_tracker():
    """conftest.fresh_moe_tracker for this module's shared runs: an earlier test's manual
    backward (test_generation trains a step by hand) leaves a 0-d aux-loss scale that the
    schedule's set_loss_scale cannot copy its [1] scale into."""
    from parallel_harness import reset_process_globals

    reset_process_globals()
    yield
    reset_process_globals()


def test_a_cascade_trains_and_logs_its_phases(straight):
    steps, evals = straight
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["opd/phase"] for r in steps] == [1, 1, 2, 2]
    assert [r["lr"] for r in steps] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])
    for r in steps:
        assert r["rollout/response_length"] <= 6 and 0 <= r["rollout/truncation_rate"] <= 1
        assert r["rollout/stop_rate"] + r["rollout/truncation_rate"] == pytest.approx(1.0)
        assert r["time/rollout_sec"] > 0 and r["time/teacher_sec"] > 0 and r["time/train_sec"] > 0
        # The trainer recomputes the sampling log-probs (fp32, one process: nearly equal).
        assert r["logprob_diff"] < 1e-3
        assert math.isfinite(r["opd_loss"]) and r["teacher_logprob"] < 0 and r["student_logprob"] < 0
    # Phase 1's loss is the sampled reverse KL itself; phase 2's the jsd (bounded by log 2).
    assert [r["opd_loss"] for r in steps[:2]] == pytest.approx([r["reverse_kl"] for r in steps[:2]])
    assert all(0 <= r["opd_loss"] <= math.log(2) for r in steps[2:])
    # Each phase is evaluated before its first step (its teacher) and after its last.
    assert [(r["step"], r["heldout/phase"]) for r in evals] == [(0, 1), (2, 1), (2, 2), (4, 2)]
    assert all(r["heldout/reverse_kl"] >= 0 for r in evals)


@pytest.mark.slow
def test_resume_inside_a_phase_and_across_the_switch_is_exact(teachers, cascade, straight, tmp_path):
    ckpt, logs = tmp_path / "ckpt", []
    for i, exit_at in enumerate([1, 2, 3, None]):
        log = tmp_path / f"part{i}.jsonl"
        load = teachers["student"][1] if i == 0 else str(ckpt)
        extra = ["--exit-interval", str(exit_at)] if exit_at else []
        _run_opd("--cascade", cascade, "--load", load, "--save", str(ckpt), *COMMON, *extra,
                 "--log-json", str(log))
        logs.append(_records(log))
    steps = [r for part, _ in logs for r in part]
    evals = [r for _, part in logs for r in part]
    expected_steps, expected_evals = straight
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for got, want in zip(steps, expected_steps):
        for key in ("opd_loss", "reverse_kl", "student_logprob", "teacher_logprob", "grad_norm",
                    "rollout/response_length", "lr", "opd/phase"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (got["step"], key)
    assert [(r["step"], r["heldout/phase"]) for r in evals] == [(0, 1), (2, 1), (2, 2), (4, 2)]
    for got, want in zip(evals, expected_evals, strict=True):
        assert got["heldout/reverse_kl"] == pytest.approx(want["heldout/reverse_kl"], rel=1e-6)


@pytest.mark.slow
def test_parallel_layouts_opd_equals_one_process(teachers, cascade, straight, tmp_path):
    """One torchrun launch of two processes runs the cascade at EP=2 (DP=2: each rank samples
    and trains its own rows, decoding in lockstep) and at TP=2 (vocab-parallel logits: the
    sampled token's log-prob by vocab-parallel cross-entropy, jsd over gathered chunks; the
    MoE teacher split over TP): both equal one process, step by step."""
    runs = {"ep2": ["--expert-model-parallel-size", "2"], "tp2": ["--tensor-model-parallel-size", "2"]}
    jobs = []
    for name, layout in runs.items():
        jobs.append(["opd", "--cascade", cascade, "--load", teachers["student"][1], *COMMON, *layout,
                     "--log-json", str(tmp_path / f"{name}.jsonl")])
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), __file__, str(tmp_path / "jobs.json")]
    run = subprocess.run(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "each data-parallel rank samples its own rows" in run.stdout  # EP=2: DP=2
    assert "every rank samples the whole batch" in run.stdout  # TP=2: DP=1
    expected_steps, expected_evals = straight
    for name in runs:
        steps, evals = _records(tmp_path / f"{name}.jsonl")
        assert [r["step"] for r in steps] == [1, 2, 3, 4], name
        for got, want in zip(steps, expected_steps):
            assert got["rollout/response_length"] == want["rollout/response_length"], name
            for key in ("opd_loss", "reverse_kl", "student_logprob", "teacher_logprob"):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (name, got["step"], key)
        for got, want in zip(evals, expected_evals, strict=True):
            assert got["heldout/reverse_kl"] == pytest.approx(want["heldout/reverse_kl"], rel=1e-4), name


def _worker(jobs_file: str) -> None:
    """torchrun worker: posttrain_marco.py's main for each job, in these processes."""
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(REPO))
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    import posttrain_marco
    from megatron_ext.logs import setup_logging

    setup_logging()
    for argv in json.loads(open(jobs_file).read()):
        get_moe_layer_wise_logging_tracker().clear()
        assert posttrain_marco.main(argv) == 0


if __name__ == "__main__":
    _worker(sys.argv[1])


# ====================================================================== the SGLang rollout engine
ENGINE_ARGS = ["--train-iters", "2", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2",
               "--rollout-max-response-len", "6", "--rollout-top-k", "1", "--micro-batch-size", "2",
               "--seed", "7", "--log-interval", "100", "--rollout-max-prompt-len", "48",
               "--adam-eps", "1e-6", "--lr", "1e-3"]


@pytest.fixture
def served_student(teachers, tmp_path):
    """tools/serve_teacher.py serving the student's HF directory (weights replaced from
    tmp_path by /update_weights_from_disk), in a thread of this process."""
    import threading

    serve = load_tool("serve_teacher")
    model = serve.Model(str(teachers["root"] / "student-hf"), str(teachers["tokenizer"]),
                        dtype="fp32", batch_size=4)
    server = serve.make_server(model, "127.0.0.1", 0, update_root=str(tmp_path), socket_timeout=5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", model
    server.shutdown()
    server.server_close()


def _tokens_recorded(monkeypatch):
    """Every training row's tokens, as rollout.collate builds them."""
    from megatron_ext.posttrain import rollout

    seen, collate = [], rollout.collate

    def spy(samples, pad_id, multiple=1):
        seen.append([s.prompt_ids + s.output_ids for s in samples])
        return collate(samples, pad_id, multiple)

    monkeypatch.setattr(rollout, "collate", spy)
    return seen


def test_sglang_engine_rolls_out_and_trains_as_the_megatron_engine(teachers, served_student, tmp_path,
                                                                  monkeypatch, fresh_module_tracker):
    import threading

    """The same seed, greedy (top-k 1) rollouts: --rollout-engine sglang against
    tools/serve_teacher.py serving the student (its weights synced from disk before each
    step, the step checked on every reply) samples the tokens the in-process generator samples
    and trains to the same losses; a served teacher gives the in-process teacher's loss."""
    url, model = served_student
    base = ["--load", teachers["student"][1], *ENGINE_ARGS]
    runs, seen = {}, _tokens_recorded(monkeypatch)
    for name, extra in [("megatron", ["--teacher", teachers["dense"][1]]),
                        ("sglang", ["--teacher", teachers["dense"][1], "--rollout-engine", "sglang",
                                    "--rollout-url", url, "--rollout-sync-dir", str(tmp_path / "sync")])]:
        log = tmp_path / f"{name}.jsonl"
        _run_opd(*base, *extra, "--log-json", str(log))
        runs[name] = (list(seen), _records(log)[0])
        seen.clear()
    (tok_m, steps_m), (tok_s, steps_s) = runs["megatron"], runs["sglang"]
    assert tok_m == tok_s and len(tok_m) == 4  # two steps x two micro-batches
    assert model.weight_version == "1"  # synced before step 2's rollout (and step 1's)
    for got, want in zip(steps_s, steps_m, strict=True):
        for key in ("opd_loss", "reverse_kl", "student_logprob", "teacher_logprob", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (got["step"], key)
        assert got["time/weight_sync_sec"] > 0 and got["rollout/weight_sync_gb"] > 0
        assert got["logprob_diff"] < 1e-3  # the engine's sampling log-probs are the trainer's
    # The teacher served (sglang:URL, scored through /generate) trains to the in-process loss.
    serve = load_tool("serve_teacher")
    server = serve.make_server(serve.Model(teachers["dense"][0], dtype="fp32"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        log = tmp_path / "served-teacher.jsonl"
        _run_opd(*base, "--teacher", f"sglang:http://127.0.0.1:{server.server_address[1]}",
                 "--log-json", str(log))
    finally:
        server.shutdown()
        server.server_close()
    for got, want in zip(_records(log)[0], steps_m, strict=True):
        for key in ("opd_loss", "teacher_logprob", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (got["step"], key)


def test_an_engine_still_on_old_weights_is_refused_before_training(teachers, served_student, tmp_path,
                                                                   monkeypatch, fresh_module_tracker):
    """A server that answers the weight update but keeps serving the previous weights (its
    weight_version unchanged) stops the run in one line naming its URL; nothing is saved."""
    import posttrain_marco

    url, model = served_student
    monkeypatch.setattr(model, "reload", lambda path, version: None)  # 'success', nothing loaded
    save = tmp_path / "ckpt"
    with pytest.raises(MarcoError) as e:
        posttrain_marco.main(["opd", "--load", teachers["student"][1], *ENGINE_ARGS, "--teacher",
                              teachers["dense"][1], "--rollout-engine", "sglang", "--rollout-url",
                              url, "--rollout-sync-dir", str(tmp_path / "sync"), "--save", str(save)])
    message = str(e.value)
    assert "\n" not in message and url in message and "weight_version 'default'" in message
    assert not any(save.glob("iter_*"))


def _fail_generate(model, how):
    import threading
    import time as _time

    real, calls = model.generate, []

    def generate(rows, params):
        out = real(rows, params)
        if how == "short":
            return [([], [], {"type": "length", "length": 0}) for _ in out]
        if how == "positive":
            return [(ids, [0.5] * len(lps), f) for ids, lps, f in out]
        calls.append(1)
        if len(calls) == 1:  # step 1's rollout is served; step 2's request hangs
            return out
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()  # while it hangs
        _time.sleep(60)
        return out

    return generate


@pytest.mark.parametrize("where,how,pattern", [
    ("engine", "short", "0 generated tokens"), ("engine", "positive", "log-prob 0.5"),
    ("teacher", "positive", "log-prob 0.5")])
def test_a_misbehaving_engine_or_teacher_stops_the_run_before_training(
        teachers, served_student, tmp_path, monkeypatch, fresh_module_tracker, where, how, pattern):
    """A rollout engine or served teacher answering wrongly stops OPD in one line naming its
    URL before the step trains (no checkpoint)."""
    import posttrain_marco

    url, model = served_student
    if where == "engine":
        monkeypatch.setattr(model, "generate", _fail_generate(model, how))
        extra = ["--teacher", teachers["dense"][1], "--rollout-engine", "sglang", "--rollout-url", url,
                 "--rollout-sync-dir", str(tmp_path / "sync"), "--rollout-timeout", "30"]
    else:  # the served student's process scores as a teacher (same token map)
        real = model.score
        monkeypatch.setattr(model, "score", lambda rows: [[None] + [0.5] * (len(r) - 1)
                                                          for r in real(rows)])
        extra = ["--teacher", f"sglang:{url}"]
    save = tmp_path / "ckpt"
    with pytest.raises(MarcoError) as e:
        posttrain_marco.main(["opd", "--load", teachers["student"][1], *ENGINE_ARGS, *extra,
                              "--save", str(save), "--save-interval", "1"])
    message = str(e.value)
    assert "\n" not in message and url in message and pattern in message, message
    assert not any(save.glob("iter_*"))


def test_sigterm_while_a_rollout_request_hangs_saves_and_exits(teachers, served_student, tmp_path,
                                                               monkeypatch, fresh_module_tracker, capsys):
    """Step 2's rollout request hangs (--rollout-timeout 30 s); SIGTERM ends the wait at once and
    the run leaves as on any signal: the state before step 2 saved (iteration 1), exit 0."""
    import posttrain_marco
    from megatron_ext.logs import setup_logging

    url, model = served_student
    monkeypatch.setattr(model, "generate", _fail_generate(model, "hang"))
    save = tmp_path / "ckpt"
    start = time.monotonic()
    setup_logging()  # as the entry point does: the trainer's lines to (this test's) stdout
    capsys.readouterr()
    assert posttrain_marco.main(["opd", "--load", teachers["student"][1], *ENGINE_ARGS, "--teacher",
                                 teachers["dense"][1], "--rollout-engine", "sglang", "--rollout-url",
                                 url, "--rollout-sync-dir", str(tmp_path / "sync"), "--rollout-timeout",
                                 "30", "--save", str(save), "--save-interval", "10"]) == 0
    assert time.monotonic() - start < 30
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert f"signal 15 while waiting on rollout engine {url}/generate, during the rollout of step 2; " \
           "saved at iteration 1, exiting" in capsys.readouterr().out


@pytest.mark.parametrize("model,nodes,engines", [("nano", 11, 2), ("mini", 13, 4)])
def test_sglang_sbatch_dry_run_starts_servers_and_passes_their_urls(teachers, model, nodes, engines):
    """slurm/{model}_opd_sglang.sbatch (dry run): rollout engines and the served teacher are
    started with `python -m sglang.launch_server` on their own nodes, /health is waited for,
    and the training command (on the remaining 8 nodes) gets their URLs."""
    import shlex

    import posttrain_marco
    from megatron_ext.posttrain.opd import resolve_opd_args

    env = subprocess_env(QWEN3_30B_A3B_MCORE=teachers["moe30b"][1], MARCO_DRY_RUN="1",
                         MARCO_CKPT_ROOT="/ckpt", MARCO_DATA_ROOT="/data",
                         MARCO_SGLANG_TEACHERS="QWEN3_NEXT_80B_A3B=/models/qwen3-next-80b:1")
    run = subprocess.run(["bash", str(REPO / f"slurm/{model}_opd_sglang.sbatch")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    servers = [shlex.split(line.rstrip(" &")) for line in lines if "sglang.launch_server" in line]
    assert len(servers) == engines + 1
    hosts = [next(a.split("=")[1] for a in s if a.startswith("--nodelist=")) for s in servers]
    assert hosts == [f"node{i}" for i in range(engines + 1)]  # each on its own node
    paths = [s[s.index("--model-path") + 1] for s in servers]
    assert paths[-1] == "/models/qwen3-next-80b" and all(p.endswith("student-initial") for p in paths[:-1])
    urls = [f"http://node{i}:30000" for i in range(engines)]
    assert f"# wait for /health: {' '.join(urls)} http://node{engines}:30000" in lines
    exports = dict(line[len("export "):].split("=", 1) for line in lines if line.startswith("export "))
    assert exports["QWEN3_NEXT_80B_A3B"] == f"sglang:http://node{engines}:30000"
    srun = shlex.split(lines[-1])
    trainers = ",".join(f"node{i}" for i in range(engines + 1, nodes))
    assert "--nodes=8" in srun and f"--nodelist={trainers}" in srun
    argv = srun[srun.index("posttrain_marco.py") + 1:]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QWEN3_30B_A3B_MCORE", teachers["moe30b"][1])
        mp.setenv("QWEN3_NEXT_80B_A3B", exports["QWEN3_NEXT_80B_A3B"])
        args = resolve_opd_args(posttrain_marco.build_parser().parse_args(argv))
    assert args.rollout_engine == "sglang" and args.rollout_url == urls
    assert args.rollout_sync_dir.endswith(f"rollout/{model}/weights")
    assert [p.teacher.kind for p in args.opd_cascade.phases] == ["megatron", "sglang"]
    assert args.opd_cascade.phases[1].teacher.path == f"sglang:http://node{engines}:30000"


def test_engine_and_served_teacher_flags_are_checked(teachers, tmp_path):
    """A served teacher refuses the full-vocabulary losses and a temperature other than 1
    (SGLang scores prompt tokens at T = 1); --rollout-url needs --rollout-engine sglang and the
    reverse; each one line naming the flag or phase."""
    import posttrain_marco
    from megatron_ext.posttrain.opd import opd_options

    parse = posttrain_marco.build_parser().parse_args
    base = ["opd", "--teacher", "sglang:http://127.0.0.1:9", "--train-iters", "2"]
    assert opd_options(parse(base)).cascade.phases[0].teacher.kind == "sglang"
    for extra, pattern in [
        (["--opd-loss", "jsd"], "--opd-loss jsd needs the teacher's full logits; a served"),
        (["--rollout-temperature", "0.8"], "--rollout-temperature 0.8 with a served"),
        (["--rollout-url", "http://h:1"], "--rollout-url is for --rollout-engine sglang"),
        (["--rollout-engine", "sglang"], "give --rollout-url"),
        (["--rollout-engine", "sglang", "--rollout-url", "http://h:1"], "give --rollout-sync-dir"),
        (["--rollout-engine", "sglang", "--rollout-url", "h:1", "--save", str(tmp_path)],
         "--rollout-url h:1: expected http://HOST:PORT"),
        (["--rollout-sync-interval", "0"], "--rollout-sync-interval must be >= 1"),
        (["--rollout-timeout", "nan"], "--rollout-timeout must be a positive number"),
    ]:
        with pytest.raises(MarcoError, match=pattern) as e:
            opd_options(parse(base + extra))
        assert "\n" not in str(e.value)
    opts = opd_options(parse(base + ["--rollout-engine", "sglang", "--rollout-url", "http://h:1",
                                     "http://h:2", "--save", str(tmp_path)]))
    assert opts.engine_urls == ("http://h:1", "http://h:2")
    assert opts.sync_dir == str(tmp_path / "rollout-weights")
