"""Generation (megatron_ext/inference/generation.py, tools/generate.py).

Two random Qwen3 models (a qwen3_moe and a dense qwen3, vocabulary of the bundled tokenizer)
go HF -> tools/import_hf_to_mcore.py -> Megatron checkpoint -> tools/export_mcore_to_hf.py ->
HF, and:
  - greedy generation equals transformers' `generate` on the exported model token for token
    (and its log-probs equal HF's scores), prompts of different lengths batched on our side;
  - the KV cache equals full recompute (ids, log-probs within 1e-5), and every log-prob equals
    an independent log_softmax of one full forward of prompt + output;
  - stop tokens end a row (nothing after the first), top-k = 1 is greedy, sampling is
    reproducible under a seed and independent of the batch, top-k/top-p filter as transformers
    does, and draws follow the filtered distribution;
  - EP=2, TP=2 (dense and MoE) and TP=2 x EP=2 over gloo give what one process gives, the same
    on both ranks (one torchrun launch runs all of them, and the CLI at EP=2);
  - the CLI writes what `generate` returns and fails in one line naming FILE:LINE or the flag.

This file is also the torchrun worker (`python tests/test_generation.py SPEC.json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import _free_port, load_tool  # noqa: E402

VOCAB = 8192  # the bundled SentencePiece tokenizer's, so the CLI can run on these models
NEW = 12
PROMPT_LENGTHS = (5, 11, 3, 8)
GREEDY = dict(max_new_tokens=NEW, temperature=0.0)
SAMPLED = dict(max_new_tokens=NEW, temperature=1.0, top_k=50, top_p=0.9)


def make_prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, megatron_single_rank):
    """{kind: (Megatron checkpoint, exported HF directory)} for kind in moe, dense."""
    from helpers_hf import make_dense_qwen3, make_moe_qwen3

    root = tmp_path_factory.mktemp("generation")
    importer, exporter = load_tool("import_hf_to_mcore"), load_tool("export_mcore_to_hf")
    out = {}
    for kind, make in (("moe", make_moe_qwen3), ("dense", make_dense_qwen3)):
        src, ckpt, hf = root / f"{kind}-src", root / f"{kind}-ckpt", root / f"{kind}-hf"
        make(str(src), seed=11, vocab_size=VOCAB)
        assert importer.main(["--hf-dir", str(src), "--save", str(ckpt)]) == 0
        assert exporter.main(["--load", str(ckpt), "--out", str(hf)]) == 0
        out[kind] = (str(ckpt), str(hf))
    return out


@pytest.fixture(scope="module")
def models(checkpoints):
    from megatron_ext.inference.loading import load_model_from_checkpoint

    return {kind: load_model_from_checkpoint(ckpt)[0] for kind, (ckpt, _) in checkpoints.items()}


@pytest.fixture(scope="module")
def moe_runs(models):
    """The MoE's generations under several settings, shared by the tests below."""
    from megatron_ext.inference.generation import SamplingParams, generate

    model, prompts = models["moe"], make_prompts()
    runs = {
        "greedy": generate(model, prompts, SamplingParams(**GREEDY)),
        "sampled": generate(model, prompts, SamplingParams(**SAMPLED), seed=7),
    }
    # Stop tokens that end rows 0 and 1 early (their tokens at steps 2 and 6), so two of the
    # four rows finish mid-way and are dropped from the cache while the others go on.
    for name, params, seed in (("greedy", GREEDY, 0), ("sampled", SAMPLED, 7)):
        stops = (runs[name][0].output_ids[2], runs[name][1].output_ids[6])
        p = SamplingParams(**params, stop_ids=stops)
        runs[f"{name}-stop"] = generate(model, prompts, p, seed=seed)
        runs[f"{name}-stop-recompute"] = generate(model, prompts, p, seed=seed, use_cache=False)
        runs[f"{name}-stop-ids"] = stops
    # The same with the finished rows kept in the batch to the end (no compaction): they must
    # get nothing after their stop token (the batch compacts only once COMPACT_SHARE stopped).
    from megatron_ext.inference import generation

    share, generation.COMPACT_SHARE = generation.COMPACT_SHARE, 2.0
    try:
        p = SamplingParams(**GREEDY, stop_ids=runs["greedy-stop-ids"])
        runs["greedy-stop-uncompacted"] = generate(model, prompts, p)
    finally:
        generation.COMPACT_SHARE = share
    return runs


def _assert_same(a, b, tol=1e-5):
    for x, y in zip(a, b, strict=True):
        assert x.output_ids == y.output_ids and x.finish_reason == y.finish_reason
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs, strict=True)) <= tol


# ------------------------------------------------------------------------------ vs transformers
@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_greedy_equals_transformers_generate_on_the_exported_model(kind, models, checkpoints):
    from transformers import AutoModelForCausalLM

    from megatron_ext.inference.generation import SamplingParams, generate

    hf = AutoModelForCausalLM.from_pretrained(checkpoints[kind][1], dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run to max_new_tokens, as ours without stop ids
    prompts = make_prompts(seed=1)
    ours = generate(models[kind], prompts, SamplingParams(**GREEDY))  # batched, left-padded
    gap = 0.0
    for prompt, g in zip(prompts, ours):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                          do_sample=False, pad_token_id=0, output_scores=True,
                          return_dict_in_generate=True)
        assert ref.sequences[0, len(prompt):].tolist() == g.output_ids
        scores = torch.log_softmax(torch.cat(ref.scores).float(), dim=-1)
        hf_lp = scores.gather(1, torch.tensor(g.output_ids)[:, None]).squeeze(1)
        gap = max(gap, (hf_lp - torch.tensor(g.logprobs)).abs().max().item())
    assert gap < 1e-4, gap
    print(f"{kind}: {len(prompts)} prompts x {NEW} tokens identical to HF; log-prob gap {gap:.1e}")


# ------------------------------------------------------------------------------ cache, log-probs
def test_kv_cache_equals_full_recompute(moe_runs):
    for name in ("greedy", "sampled"):
        _assert_same(moe_runs[f"{name}-stop"], moe_runs[f"{name}-stop-recompute"])


def test_logprobs_equal_log_softmax_of_one_full_forward(models, moe_runs):
    model = models["moe"]
    gap = 0.0
    for name, temperature in (("greedy", 1.0), ("sampled", SAMPLED["temperature"]),
                              ("sampled-stop", SAMPLED["temperature"])):
        for g in moe_runs[name]:
            seq = torch.tensor([g.prompt_ids + g.output_ids[:-1]])
            with torch.no_grad():
                logits = model.eval()(seq, torch.arange(seq.shape[1])[None], None).float()[0]
            logits = logits[len(g.prompt_ids) - 1:]
            lp = torch.log_softmax(logits / temperature, dim=-1)
            chosen = lp.gather(1, torch.tensor(g.output_ids)[:, None]).squeeze(1)
            gap = max(gap, (chosen - torch.tensor(g.logprobs)).abs().max().item())
            if name == "greedy":
                assert logits.argmax(dim=-1).tolist() == g.output_ids
    model.train()
    assert gap < 1e-5, gap


def test_cached_keys_are_rotated_once(models):
    """The RoPE shortcut (decode_shortcuts.RopeOnce) is taken at every layer of every forward: a
    Megatron-Core upgrade that changes how the static cache holds keys shows here (the
    equality tests above then tell whether results still hold)."""
    from megatron_ext.inference import decode_shortcuts, generation

    model = models["moe"]
    pad = torch.zeros(2, 9, dtype=torch.bool)
    for inference_mode in (False, True):
        with generation._inference_layout(model), generation._without_autograd(model, inference_mode):
            steps = generation._CachedSteps(model, 2, 9, pad)
            steps.prefill(torch.tensor(make_prompts()[3:4] * 2))
            steps.decode(torch.tensor([1, 2]))
        assert steps.rope.hits == 2 * model.config.num_layers, inference_mode
    assert decode_shortcuts.RopeOnce(steps).original is steps.rope.original  # put back


def test_rope_shortcut_is_megatrons_rope_bit_for_bit(models):
    """RopeOnce rotates with cos/sin computed once per forward; the result must be Megatron's
    unfused RoPE exactly (fp32 and bf16, one and many positions, a slice of a longer table)."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from megatron_ext.inference import decode_shortcuts

    config = models["moe"].config
    rope = decode_shortcuts.RopeOnce(steps=None)
    g = torch.Generator().manual_seed(0)
    table = torch.rand(40, 1, 1, 16, generator=g) * 30  # [positions, 1, 1, head dim] angles
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (slice(7, 8), slice(0, 40), slice(3, 25)):
            freqs = table[rows]
            t = torch.randn(freqs.shape[0], 3, 2, 16, generator=g).to(dtype)
            ours = rope._rotate(t, freqs, 1.0)
            again = rope._rotate(t, freqs, 1.0)  # from the cache
            theirs = apply_rotary_pos_emb(t, freqs, config)
            assert torch.equal(ours, theirs) and torch.equal(again, theirs), (dtype, rows)
    assert len(rope.cos_sin) == 6  # one cos/sin pair per (positions, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tp1_shortcuts_are_megatrons_forward_bit_for_bit(dtype, checkpoints):
    """Tp1Shortcuts (plain-matmul linears and router gating at TP = 1 without autograd) gives
    Megatron's logits to the last bit, on the dense and the MoE model (SequentialMLP experts:
    linears of their own), and leaves nothing behind: the class methods serve training again."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_ext.inference.decode_shortcuts import Tp1Shortcuts
    from megatron_ext.inference.loading import load_model_from_checkpoint

    tokens = torch.tensor(make_prompts(seed=3)[1:2] * 3)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    for kind, backend in (("dense", "sequential"), ("moe", "sequential"), ("moe", "torch-grouped")):
        model, _ = load_model_from_checkpoint(checkpoints[kind][0], expert_backend=backend,
                                              params_dtype=dtype)
        model.eval()
        linears = [m for m in model.modules() if type(m) in (ColumnParallelLinear, RowParallelLinear)]
        with torch.no_grad():
            megatron = model(tokens, positions, None)
            with Tp1Shortcuts(model) as shortcuts:
                assert all("forward" in m.__dict__ for m in linears)
                routers = model.config.num_layers if kind == "moe" else 0
                assert len(shortcuts.installed) == len(linears) + routers
                ours = model(tokens, positions, None)
        assert torch.equal(ours, megatron), (kind, backend, dtype)
        assert not any("forward" in m.__dict__ or "gating" in m.__dict__ for m in model.modules())
        with Tp1Shortcuts(model) as shortcuts:  # autograd on: nothing is installed
            assert not shortcuts.installed


def test_inference_mode_gives_the_same_and_the_model_still_trains(models, moe_runs):
    """generate(inference_mode=True) (the CLI's) equals the default, and leaves the model as
    it was: train mode, and a backward pass at the very sequence length generation used (the
    length of the RoPE table made during generation) runs."""
    from megatron_ext.inference.generation import SamplingParams, generate

    model, prompts = models["moe"], make_prompts()
    fast = generate(model, prompts, SamplingParams(**SAMPLED), seed=7, inference_mode=True)
    _assert_same(fast, moe_runs["sampled"], tol=0)
    assert model.training
    ids = torch.randint(0, VOCAB, (1, max(PROMPT_LENGTHS) + NEW))
    logits = model(ids, torch.arange(ids.shape[1])[None], None)
    logits.float().logsumexp(-1).mean().backward()
    assert model.embedding.word_embeddings.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_moe_routes_in_eval_mode_as_in_training(models):
    model, ids = models["moe"], torch.tensor(make_prompts(seed=2)[1:2] * 2)
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        train = model.train()(ids, positions, None)
        evaluated = model.eval()(ids, positions, None)
    model.train()
    assert torch.equal(train, evaluated)


# ------------------------------------------------------------------------------ stops, sampling
@pytest.mark.parametrize("name", ["greedy", "sampled"])
def test_stop_tokens_end_a_row_and_nothing_follows(name, moe_runs):
    stops = set(moe_runs[f"{name}-stop-ids"])
    ended = 0
    for free, stopped in zip(moe_runs[name], moe_runs[f"{name}-stop"]):
        hit = [k for k, t in enumerate(free.output_ids) if t in stops]
        if hit:
            ended += 1
            assert stopped.output_ids == free.output_ids[:hit[0] + 1]
            assert stopped.finish_reason == "stop" and len(stopped.logprobs) == hit[0] + 1
        else:
            assert stopped.output_ids == free.output_ids and stopped.finish_reason == "length"
        assert max(abs(a - b) for a, b in zip(stopped.logprobs, free.logprobs)) < 1e-5
    assert ended >= 2
    assert all(g.finish_reason == "length" and len(g.output_ids) == NEW for g in moe_runs[name])


def test_a_stopped_row_left_in_the_batch_gets_nothing_more(moe_runs):
    kept, compacted = moe_runs["greedy-stop-uncompacted"], moe_runs["greedy-stop"]
    for a, b in zip(kept, compacted):
        assert (a.output_ids, a.finish_reason) == (b.output_ids, b.finish_reason)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
    assert sum(g.finish_reason == "stop" for g in kept) >= 2


def test_top_k_1_is_greedy(models, moe_runs):
    from megatron_ext.inference.generation import SamplingParams, generate

    top1 = generate(models["moe"], make_prompts(), SamplingParams(max_new_tokens=NEW, top_k=1),
                    seed=5)
    _assert_same(top1, moe_runs["greedy"])


def test_sampling_is_reproducible_and_independent_of_the_batch(models, moe_runs):
    from megatron_ext.inference.generation import SamplingParams, generate

    model, prompts, params = models["moe"], make_prompts(), SamplingParams(**SAMPLED)
    _assert_same(generate(model, prompts, params, seed=7), moe_runs["sampled"])
    _assert_same(generate(model, prompts, params, seed=7, batch_size=1), moe_runs["sampled"])
    other = generate(model, prompts, params, seed=8)
    assert [g.output_ids for g in other] != [g.output_ids for g in moe_runs["sampled"]]
    # n copies of one prompt draw different samples (OPD's n responses per prompt)
    copies = generate(model, [prompts[0]] * 3, params, seed=7)
    assert len({tuple(g.output_ids) for g in copies}) == 3
    assert copies[0].output_ids == moe_runs["sampled"][0].output_ids


def test_top_k_top_p_filter_as_transformers_does():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from megatron_ext.inference.generation import filter_logits

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 50, generator=g) * 3
    scores[0, :4] = scores[0, 10]  # ties around the k-th value
    for k, p in ((0, 0.7), (5, 1.0), (10, 0.5), (1, 0.9), (0, 1.0)):
        ref = scores.clone()
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        assert torch.equal(filter_logits(scores, k, p), ref), (k, p)


def test_draws_follow_the_filtered_distribution():
    """10,000 rows of one logits vector: each token's frequency within 4.5 standard errors of
    its filtered probability; filtered-out tokens are never drawn."""
    from megatron_ext.inference.generation import SamplingParams, _Chooser, filter_logits

    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    params = SamplingParams(max_new_tokens=1, temperature=0.7, top_k=6, top_p=0.95)
    n = 10_000
    chooser = _Chooser(params, seed=3, indices=range(n), vocab=8)
    ids, lps = chooser.choose(logits.expand(n, -1).clone(), list(range(n)))
    expected = filter_logits(logits[None] / 0.7, 6, 0.95).softmax(-1)[0].double()
    freq = torch.bincount(ids, minlength=8).double() / n
    se = (expected * (1 - expected) / n).sqrt()
    assert torch.all((freq - expected).abs() <= 4.5 * se + 1e-12), (freq, expected)
    assert expected[-2:].sum() == 0 and freq[-2:].sum() == 0
    full = torch.log_softmax(logits / 0.7, -1)  # reported log-probs: before truncation
    assert torch.allclose(lps, full[ids])


def test_sdpa_causal_block_shorter_than_keys_is_aligned_bottom_right(megatron_single_rank):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ext.attention import SDPAttention
    from megatron_ext.model import marco_config
    from megatron_ext.presets import get_preset

    attn = SDPAttention(marco_config(get_preset("tiny")), 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(0)
    s, b = 12, 2
    q = torch.randn(s, b, 4, 32, generator=g)
    k, v = torch.randn(s, b, 2, 32, generator=g), torch.randn(s, b, 2, 32, generator=g)
    full = attn(q, k, v, None)
    tail = attn(q[-3:], k, v, None)  # the last 3 queries against all 12 keys
    assert (tail - full[-3:]).abs().max().item() < 1e-6
    # One query (a decode step: the query heads folded onto their KV head), with and without
    # a padding mask, equals the last row of the full causal attention.
    assert (attn(q[-1:], k, v, None) - full[-1:]).abs().max().item() < 1e-6
    padded = torch.zeros(b, 1, 1, s, dtype=torch.bool)
    padded[1, ..., :4] = True  # row 1: its first 4 keys are padding (True = masked)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None] | padded
    full = attn(q, k, v, causal & ~torch.eye(s, dtype=torch.bool))
    assert (attn(q[-1:], k, v, padded) - full[-1:]).abs().max().item() < 1e-6


def test_bad_arguments_are_one_line_errors(models):
    from megatron_ext.errors import LayoutError, UsageError
    from megatron_ext.inference.generation import SamplingParams, generate

    for bad, flag in ((dict(max_new_tokens=0), "--max-new-tokens"), (dict(temperature=-1.0), "--temperature"),
                      (dict(top_k=-2), "--top-k"), (dict(top_p=0.0), "--top-p")):
        with pytest.raises(UsageError, match=f"^{flag}"):
            SamplingParams(**bad)
    model, params = models["dense"], SamplingParams(max_new_tokens=2)
    with pytest.raises(UsageError, match="prompt 1 is empty"):
        generate(model, [[1], []], params)
    with pytest.raises(UsageError, match=f"prompt 0: token id {VOCAB} is outside"):
        generate(model, [[VOCAB]], params)
    with pytest.raises(UsageError, match="prompt 0: 600 tokens .* exceed the model's 512 positions"):
        generate(model, [[1] * 600], params)
    with pytest.raises(LayoutError, match="one model chunk, got 2"):
        generate([model, model], [[1]], params)


# ------------------------------------------------------------------------------ CLI
def _write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_cli_writes_what_generate_returns(checkpoints, models, tmp_path, capsys):
    from megatron_ext.inference.chat import ChatTokenizer, render_prompt
    from megatron_ext.inference.generation import SamplingParams, generate

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Was macht ls?"}]
    prompts = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "The ls command", "id": 7}), "",
                                            json.dumps({"messages": messages})])
    out = tmp_path / "out" / "o.jsonl"
    args = ["--load", checkpoints["moe"][0], "--prompts", prompts, "--out", str(out),
            "--temperature", "0", "--max-new-tokens", "6", "--batch-size", "1"]
    assert load_tool("generate").main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tok = ChatTokenizer.from_args("SentencePieceTokenizer", None)
    assert rows[0]["id"] == 7 and rows[0]["prompt_ids"] == tok.encode("The ls command")
    assert rows[1]["messages"] == messages and rows[1]["prompt_ids"] == render_prompt(messages, tok)
    expected = generate(models["moe"], [r["prompt_ids"] for r in rows],
                        SamplingParams(max_new_tokens=6, temperature=0, stop_ids=tok.stop_ids))
    for row, g in zip(rows, expected):
        assert row["output_ids"] == g.output_ids and row["finish_reason"] == g.finish_reason
        assert max(abs(a - b) for a, b in zip(row["logprobs"], g.logprobs)) < 1e-5
        shown = g.output_ids[:-1] if g.finish_reason == "stop" else g.output_ids
        assert row["text"] == tok.decode(shown)
    assert "wrote" in capsys.readouterr().out
    # An existing output needs --overwrite.
    assert load_tool("generate").main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_cli_errors_are_one_line_naming_the_input(checkpoints, tmp_path, capsys):
    ckpt = checkpoints["moe"][0]
    good = json.dumps({"prompt": "hello"})
    cases = [
        ([good, "{not json"], "p.jsonl:2: invalid JSON"),
        ([good, json.dumps({"text": "x"})], "p.jsonl:2: expected an object with either"),
        ([json.dumps({"prompt": 3})], "p.jsonl:1: \"prompt\" must be a string"),
        ([good, "", json.dumps({"messages": [{"role": "user"}]})],
         r"p.jsonl:3: message 0 \(user\) has no 'content'"),
        ([json.dumps({"messages": [{"role": "system", "content": "x"}]})],
         "p.jsonl:1: the conversation has no user turn"),
        ([json.dumps({"prompt": "word " * 600})],
         r"p.jsonl:1: \d+ prompt tokens \+ --max-new-tokens 8 exceed"),
        ([], "no prompts"),
    ]
    tool = load_tool("generate")
    for lines, pattern in cases:
        prompts = _write(tmp_path / "p.jsonl", lines)
        code = tool.main(["--load", ckpt, "--prompts", prompts, "--out", str(tmp_path / "o.jsonl"),
                          "--max-new-tokens", "8"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        assert re.search(pattern, err[0]), (pattern, err[0])
        assert not (tmp_path / "o.jsonl").exists()
    prompts = _write(tmp_path / "p.jsonl", [good])
    for flags, pattern in ((["--pipeline-model-parallel-size", "2"], "--pipeline-model-parallel-size 2"),
                           (["--top-p", "0"], "--top-p must be in"),
                           (["--expert-model-parallel-size", "2"], "world size 1"),
                           (["--load", str(tmp_path / "nothing")], "no such checkpoint")):
        code = tool.main(["--load", ckpt, "--prompts", prompts, "--out", str(tmp_path / "o.jsonl"), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and pattern in err[0], err


# ------------------------------------------------------------------------------ benchmark
@pytest.mark.slow
def test_generation_bench_prints_its_table(megatron_single_rank, capsys):
    """bench/bench_generate.py still runs (toy sizes; its figures live in bench/RESULTS.md)."""
    from bench.bench_generate import main

    assert main(["--cases", "tiny", "--batch", "2", "--prompt-len", "6", "--new-tokens", "3",
                 "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^date: .*\nmachine: .*\npackages: torch ", out, re.M), out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    assert [r[0].strip().split(":")[0].split(" ")[0] for r in rows[1:]] == ["ours", "ours", "HF"]
    for row in rows[1:]:
        assert float(row[2].replace(",", "")) > 0 and row[6].strip() == "2/2 rows", row
    assert re.search(r"ours \(faster backend\) vs HF: \d+\.\d\dx the tokens/s, "
                     r"\d+\.\d\dx by CPU time, paired rounds", out)


# ------------------------------------------------------------------------------ parallel layouts
# name: (model, ParallelLayout fields, expert backend, token dispatcher); the CLI run adds EP=2
# with the CLI's default expert backend (torch._grouped_mm on CPU).
LAYOUTS = {
    "moe-ep2": ("moe", dict(expert=2), "sequential", "allgather"),
    "moe-ep2-alltoall": ("moe", dict(expert=2), "torch-grouped", "alltoall"),  # the trainer's EP>1
    "moe-tp2": ("moe", dict(tensor=2, sequence_parallel=True), "sequential", "allgather"),
    "moe-tp2-ep2": ("moe", dict(tensor=2, expert=2, sequence_parallel=True), "sequential", "alltoall"),
    "dense-tp2": ("dense", dict(tensor=2, sequence_parallel=True), "sequential", "allgather"),
}
RUNS = {"greedy": (GREEDY, 0), "sampled": (SAMPLED, 7)}


@pytest.mark.slow
def test_parallel_layouts_generate_what_one_process_generates(checkpoints, models, tmp_path):
    from megatron_ext.inference.generation import SamplingParams, generate

    prompts_file = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "The ls command lists"}),
                                                 json.dumps({"prompt": "Bonjour"})])
    cli = ["--load", checkpoints["moe"][0], "--prompts", prompts_file, "--temperature", "0",
           "--max-new-tokens", "6"]
    spec = {"checkpoints": {k: v[0] for k, v in checkpoints.items()}, "out": str(tmp_path),
            "cli": [*cli, "--out", str(tmp_path / "cli-ep2.jsonl"), "--expert-model-parallel-size", "2"]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), __file__, str(tmp_path / "spec.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank gets the same result
    result = ranks[0]
    prompts = make_prompts()
    for name, (kind, *_) in LAYOUTS.items():
        assert result[name]["state_restored"], name
        for run_name, (params, seed) in RUNS.items():
            reference = generate(models[kind], prompts, SamplingParams(**params), seed=seed)
            got = [_generation(g) for g in result[name][run_name]]
            _assert_same(got, reference)
    assert "different prompts" in result["mismatch"]
    assert result["cli"] == 0
    one = tmp_path / "cli-one.jsonl"
    assert load_tool("generate").main([*cli, "--out", str(one)]) == 0
    outputs = [list(map(json.loads, p.read_text().splitlines())) for p in (one, tmp_path / "cli-ep2.jsonl")]
    assert len(outputs[0]) == len(outputs[1]) == 2
    for a, b in zip(*outputs):
        assert a["output_ids"] == b["output_ids"] and a["text"] == b["text"]


def _generation(d: dict):
    from megatron_ext.inference.generation import Generation

    return Generation(**d)


# ------------------------------------------------------------------------------ torchrun worker
def _worker(spec_path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_ext import checkpointing, parallel
    from megatron_ext.config import ModelOptions, MoEOptions
    from megatron_ext.errors import UsageError
    from megatron_ext.inference.generation import SamplingParams, generate
    from megatron_ext.model import build_stage
    from megatron_ext.parallel import ParallelLayout

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    prompts, result = make_prompts(), {}
    model = None
    for name, (kind, layout, backend, dispatcher) in LAYOUTS.items():
        parallel.init_distributed(ParallelLayout(**layout), seed=0)
        ckpt = spec["checkpoints"][kind]
        options = ModelOptions(expert_backend=backend, moe=MoEOptions(token_dispatcher=dispatcher))
        model, _ = build_stage(checkpointing.preset_from_checkpoint(ckpt), options)
        checkpointing.load_checkpoint(ckpt, [model], load_rng=False)
        before = (model.training, model.config.sequence_parallel)
        result[name] = {run: [dataclasses.asdict(g) for g in
                              generate(model, prompts, SamplingParams(**params), seed=seed)]
                        for run, (params, seed) in RUNS.items()}
        result[name]["state_restored"] = before == (model.training, model.config.sequence_parallel)
    try:  # ranks given different prompts: an error on every rank, not a hang
        generate(model, [[1 + rank]], SamplingParams(max_new_tokens=2))
        result["mismatch"] = "no error"
    except UsageError as e:
        result["mismatch"] = str(e)
    result["cli"] = load_tool("generate").main(spec["cli"])
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1])
