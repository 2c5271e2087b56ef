"""GPU checks (`pytest -m gpu`, one CUDA GPU; run by bench/gpu_check.sh). Skipped in the CPU
suite (tests/conftest.py hides GPUs there) and wherever CUDA is absent; TransformerEngine
checks skip where TE is absent. What they establish on the target path (bf16, NCCL, torch-grouped
experts without TE):

  - bf16 `tiny` training through the entry point: the loss falls, every step finite;
  - an upcycled checkpoint loaded weights-only: the first steps' losses (lr 0) are the loaded
    model's own losses on the same batches (issue 18, 1.1: the optimizer's stale fp32 main
    params would restore the random init after step 1);
  - torch-grouped experts == SequentialMLP in bf16, forward and backward;
  - save and resume with the distributed optimizer, on one GPU: the resumed steps repeat the
    uninterrupted run's losses (fp32 to 1e-5; bf16 within kernel non-determinism);
  - export of the GPU-trained checkpoint: transformers' logits == Megatron's (fp32 compute);
  - the tools' loader puts the whole model on the GPU, and generation never drops tokens;
  - SDPA with a mask and grouped K/V heads stays on a fused kernel (no [b, h, s, s] scores);
  - the routing recorder's hooks do not synchronise the GPU (1.9);
  - TE: checkpoints of the TE and the non-TE spec load into each other (1.4), and the TE-only
    levers (FP8, permutation fusion) train a few steps.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_tool, run_pretrain, subprocess_env

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

SMALL = ["--preset", "tiny", "--seq-length", "128", "--micro-batch-size", "4",
         "--global-batch-size", "8", "--log-interval", "10", "--peak-tflops", "989"]


def _gpu_env() -> dict:
    env = subprocess_env()
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS workspaces
    return env


def _records(path) -> list[dict]:
    return [r for r in map(json.loads, open(path)) if "lm_loss" in r]


def _pretrain(tmp, name, *args, timeout=600):
    log = tmp / f"{name}.jsonl"
    run = run_pretrain(*SMALL, *args, "--log-json", str(log), env=_gpu_env(), timeout=timeout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return _records(log)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """bf16 tiny MoE, 40 steps on the bundled corpus, saved (the export test reads it)."""
    tmp = tmp_path_factory.mktemp("gpu_train")
    records = _pretrain(tmp, "bf16", "--bf16", "--train-iters", "40", "--lr", "3e-3",
                        "--save", str(tmp / "ckpt"))
    return tmp / "ckpt", records


def test_bf16_training_loss_falls(trained):
    _, records = trained
    losses = [r["lm_loss"] for r in records]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert all(math.isfinite(r["grad_norm"]) for r in records)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"bf16 tiny: loss {first:.3f} -> {last:.3f}; "
          f"{records[-1]['tokens_per_sec']:,.0f} tok/s; peak {records[-1]['peak_memory_gib']:.2f} GiB")
    assert last < first - 0.5, (first, last)


def _loss_of(model_chunks, batches, forward_step) -> float:
    """Token-mean cross-entropy of the model on `batches`, forward only."""
    total, count = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            output, loss_func = forward_step(iter([batch]), model_chunks[0])
            s, n, _ = loss_func(output)
            total, count = total + float(s), count + float(n)
    return total / count


def test_upcycled_checkpoint_trains_from_its_weights(megatron_single_rank, fresh_moe_tracker,
                                                     tmp_path):
    from helpers_hf import load_upcycle_tool, make_dense_qwen3, write_tokenizer_stub

    from megatron_ext.arguments import parse_args
    from megatron_ext.trainer import Trainer, forward_step

    dense, up = tmp_path / "dense", tmp_path / "up"
    make_dense_qwen3(str(dense), vocab_size=8192, hidden_size=128, intermediate_size=512,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    write_tokenizer_stub(str(dense))
    tool = load_upcycle_tool()
    assert tool.main(["--hf-dir", str(dense), "--save", str(up), "--num-experts", "8",
                      "--moe-ffn-hidden-size", "128", "--moe-router-topk", "2"]) == 0
    cfg = parse_args(["--load", str(up), "--no-load-optim", "--bf16", "--lr", "0", "--min-lr", "0",
                      "--lr-warmup-iters", "0", "--train-iters", "3", "--seq-length", "128",
                      "--micro-batch-size", "4", "--global-batch-size", "8", "--log-interval", "1",
                      "--peak-tflops", "989"])
    trainer = Trainer(cfg)
    for chunk in trainer.model:
        chunk.eval()
    expected = [_loss_of(trainer.model, trainer.data.micro_batches(step, 0, 1, 4), forward_step)
                for step in range(3)]
    for chunk in trainer.model:
        chunk.train()
    losses = trainer.train()
    print(f"upcycled: loaded-model losses {expected}, training losses {losses}")
    assert losses == pytest.approx(expected, rel=2e-3)


def test_torch_grouped_experts_match_sequential_in_bf16(megatron_single_rank, fresh_moe_tracker,
                                                        tmp_path):
    from megatron_ext import checkpointing
    from megatron_ext.config import ModelOptions
    from megatron_ext.inference.loading import load_model_from_checkpoint
    from megatron_ext.model import build_model, marco_config
    from megatron_ext.presets import get_preset, override

    preset = override(get_preset("tiny"), num_layers=2)
    torch.manual_seed(0)
    options = ModelOptions(params_dtype=torch.bfloat16, expert_backend="sequential")
    sequential = build_model(preset, marco_config(preset, options=options), "sequential").cuda()
    checkpointing.save_checkpoint(str(tmp_path), checkpointing.TrainState(), [sequential],
                                  model_info=checkpointing.model_info(preset))
    grouped, _ = load_model_from_checkpoint(str(tmp_path), expert_backend="torch-grouped",
                                            params_dtype=torch.bfloat16)
    grouped = grouped.cuda()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, preset.vocab_size, (4, 128), generator=g).cuda()
    positions = torch.arange(128, device="cuda").expand(4, 128)
    out_s, out_g = sequential(tokens, positions, None), grouped(tokens, positions, None)
    rel = ((out_s.float() - out_g.float()).norm() / out_s.float().norm()).item()
    assert rel < 1e-2, rel
    out_s.float().pow(2).mean().backward()
    out_g.float().pow(2).mean().backward()
    layer_s, layer_g = sequential.decoder.layers[0].mlp, grouped.decoder.layers[0].mlp
    for a, b in [(layer_s.router.weight.grad, layer_g.router.weight.grad),
                 (layer_s.experts.local_experts[3].linear_fc2.weight.grad.t(),
                  layer_g.experts.weight2.grad.view(16, 128, 128)[3])]:
        rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
        assert rel < 3e-2, rel


@pytest.mark.parametrize("dtype, rel", [("--fp32", 1e-5), ("--bf16", 2e-3)])
def test_distributed_optimizer_resume_repeats_the_run(tmp_path, dtype, rel):
    common = [dtype, "--use-distributed-optimizer", "--train-iters", "4", "--lr", "3e-3"]
    straight = _pretrain(tmp_path, "straight", *common, "--save", str(tmp_path / "a"),
                         "--save-interval", "2")
    resumed = _pretrain(tmp_path, "resumed", *common, "--load", str(tmp_path / "a" / "iter_0000002"),
                        "--save", str(tmp_path / "b"))
    a = [r["lm_loss"] for r in straight][2:]
    b = [r["lm_loss"] for r in resumed]
    print(f"{dtype}: uninterrupted steps 3-4 {a}, resumed {b}")
    assert b == pytest.approx(a, rel=rel)


def test_export_of_gpu_trained_checkpoint_matches_transformers(trained, megatron_single_rank,
                                                               fresh_moe_tracker, tmp_path):
    from helpers_hf import tokens
    from transformers import AutoModelForCausalLM

    from megatron_ext.inference.loading import load_model_from_checkpoint

    torch.backends.cuda.matmul.allow_tf32 = False
    ckpt, _ = trained
    export = load_tool("export_mcore_to_hf")
    assert export.main(["--load", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).cuda().eval()
    model, preset = load_model_from_checkpoint(str(ckpt), params_dtype=torch.float32)
    model = model.eval()  # on the GPU as loaded: no .cuda() here (it hid norms left on the CPU)
    ids = tokens(seq=96, vocab=preset.vocab_size, seed=1).cuda()
    with torch.no_grad():
        ours = model(ids, torch.arange(96, device="cuda").expand_as(ids), None).float()
        theirs = hf(input_ids=ids).logits.float()
    gap = (ours - theirs).abs().max().item()
    print(f"export of the GPU-trained checkpoint: logits max abs diff {gap:.2e}")
    assert gap < 1e-3, gap


def test_loaded_checkpoint_is_on_the_gpu_and_generates_dropless(trained, megatron_single_rank,
                                                                fresh_moe_tracker):
    """A checkpoint loaded by the tools' loader has every parameter and buffer on the GPU (the
    RMSNorms and routers stayed on the CPU), generates, and a capacity-factor copy of it
    generates the same greedy tokens (Megatron drops tokens in eval mode too)."""
    from megatron_ext.config import ModelOptions, MoEOptions
    from megatron_ext.inference.generation import SamplingParams, generate
    from megatron_ext.inference.loading import load_model_from_checkpoint
    from megatron_ext.model import build_stage

    ckpt, _ = trained
    model, preset = load_model_from_checkpoint(str(ckpt), params_dtype=torch.bfloat16)
    where = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    assert where == {"cuda"}, where
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, preset.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 20, (16,), generator=g)]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    expected = generate(model, prompts, params)
    dropping, _ = build_stage(preset, ModelOptions(
        params_dtype=torch.bfloat16, moe=MoEOptions(expert_capacity_factor=0.25)))
    dropping.load_state_dict(model.state_dict())
    got = generate(dropping, prompts, params)
    assert [x.output_ids for x in got] == [x.output_ids for x in expected]


def test_sdpa_with_a_mask_and_grouped_heads_stays_fused():
    """A padding mask with grouped K/V heads (generation's prefill, the non-TE spec): no math
    kernel fallback, whose [1, 16, 8192, 8192] bf16 scores alone would be 2 GiB."""
    import torch.nn.functional as F

    from megatron_ext.attention import _grouped_kv

    q = torch.randn(1, 16, 8192, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    keep = torch.ones(8192, 8192, dtype=torch.bool, device="cuda").tril()[None, None]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    k2, v2, gqa = _grouped_kv(q, k, v, keep)
    F.scaled_dot_product_attention(q, k2, v2, attn_mask=keep, enable_gqa=gqa)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - before) / 2**30
    print(f"SDPA, mask + GQA at 8192 tokens: +{extra:.2f} GiB peak")
    assert extra < 1.0, extra


def test_routing_recorder_never_syncs_the_gpu():
    from megatron_ext.routing import RoutingRecorder

    recorder = RoutingRecorder([], num_layers=2, num_experts=8)
    routing = torch.rand(4096, 8, device="cuda") > 0.5
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in (0, 1):
            recorder._hook(layer)(None, (), (None, routing))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert recorder.totals("train")[0].tolist() == routing.sum(0).double().cpu().tolist()


def test_fixes_installed_for_this_gpu(megatron_single_rank):
    from megatron_ext import cpu_compat, mcore_fixes

    env = mcore_fixes.current_environment()
    assert env.cuda and not cpu_compat._enabled
    assert mcore_fixes.installed() == sorted(mcore_fixes.plan(env))
    print(f"GPU, TE {env.have_te}, fused Adam {env.have_apex_or_te}, Megatron-Core {env.mcore_version}: "
          f"fixes {mcore_fixes.installed()}")


# ----------------------------------------------------------------------------- TransformerEngine
def test_te_and_local_spec_checkpoints_load_into_each_other(megatron_single_rank, fresh_moe_tracker,
                                                            tmp_path):
    pytest.importorskip("transformer_engine", reason="TransformerEngine is not installed")
    from megatron_ext import checkpointing
    from megatron_ext.config import ModelOptions
    from megatron_ext.model import build_model, marco_config
    from megatron_ext.presets import get_preset, override

    preset = override(get_preset("tiny"), num_layers=2)
    info = checkpointing.model_info(preset)

    def build(use_te, seed):
        torch.manual_seed(seed)
        backend = "te" if use_te else "sequential"
        options = ModelOptions(params_dtype=torch.bfloat16, expert_backend=backend)
        return build_model(preset, marco_config(preset, options=options), backend,
                           use_te=use_te).cuda().eval()

    ids = torch.randint(0, preset.vocab_size, (2, 64), device="cuda")
    pos = torch.arange(64, device="cuda").expand(2, 64)
    local = build(False, 0)
    checkpointing.save_checkpoint(str(tmp_path / "local"), checkpointing.TrainState(), [local],
                                  model_info=info)
    te = build(True, 1)
    checkpointing.load_checkpoint(str(tmp_path / "local"), [te], load_rng=False)
    with torch.no_grad():
        a, b = local(ids, pos, None).float(), te(ids, pos, None).float()
    assert ((a - b).norm() / a.norm()).item() < 2e-2
    checkpointing.save_checkpoint(str(tmp_path / "te"), checkpointing.TrainState(), [te],
                                  model_info=info)
    back = build(False, 2)
    checkpointing.load_checkpoint(str(tmp_path / "te"), [back], load_rng=False)
    with torch.no_grad():  # the same weights back in the local spec (bf16 scatter-adds vary)
        c = back(ids, pos, None).float()
    assert ((c - a).norm() / a.norm()).item() < 1e-3


@pytest.mark.parametrize("flags", [
    ["--moe-expert-backend", "te", "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"],
    ["--moe-expert-backend", "te", "--moe-permute-fusion"],
    ["--moe-expert-backend", "te", "--recompute-granularity", "selective",
     "--recompute-modules", "moe_act", "layernorm"],
])
def test_te_levers_train(tmp_path, flags):
    pytest.importorskip("transformer_engine", reason="TransformerEngine is not installed")
    records = _pretrain(tmp_path, "te", "--bf16", "--train-iters", "5", *flags)
    assert all(math.isfinite(r["lm_loss"]) for r in records)
