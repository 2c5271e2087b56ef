"""The GPU path around the training loop, checked on CPU: loading, generation, teachers.

What a first GPU run hit before any number came out, each fixed in one place and tested here
where the path runs on CPU (tests/test_gpu.py holds the `-m gpu` twins):
  - every parameter and buffer is built on the run's device by the model builder (a model
    loaded from a checkpoint had its norms and routers on the CPU, its linears on the GPU);
  - generation never drops tokens: a student trained with a capacity factor rolls out what the
    same weights without one roll out;
  - an in-process Megatron teacher routes as its checkpoint records, whatever the student's
    router flags;
  - the distributed optimizer's torch-Adam fix follows Megatron's own HAVE_APEX_OR_TE;
  - context parallelism with sft/opd and FP8 with opd are refused at parse time in one line.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_ext.config import ModelOptions, MoEOptions
from megatron_ext.presets import get_preset


def _tiny(**changes):
    return dataclasses.replace(get_preset("tiny"), vocab_size=512, **changes)


# ------------------------------------------------------------------------------ 1. devices
def _devices(model) -> dict[str, str]:
    return {name: t.device.type for name, t in
            [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("backend", ["sequential", "torch-grouped"])
def test_builder_puts_every_parameter_and_buffer_on_the_run_device(backend, monkeypatch,
                                                                   megatron_single_rank):
    """Built for a device that is not the default one (meta stands in for a GPU), nothing of
    the model may stay behind on the CPU: not our RMSNorm, not Megatron's router weight, not
    the expert-bias buffers Megatron creates on a fixed device."""
    from megatron_ext import model as model_mod

    monkeypatch.setattr(model_mod, "run_device", lambda: torch.device("meta"), raising=False)
    moe = MoEOptions(enable_expert_bias=True, router_score_function="sigmoid")
    model, _ = model_mod.build_stage(_tiny(), ModelOptions(expert_backend=backend, moe=moe))
    devices = _devices(model)
    elsewhere = {n: d for n, d in devices.items() if d != "meta"}
    assert not elsewhere, f"not on the run's device: {sorted(elsewhere)[:5]}"
    assert any("router.expert_bias" in n for n in devices)
    assert any("layernorm" in n or "layer_norm" in n for n in devices)


# ------------------------------------------------------------------------------ 2. dropless
class _Tok:
    stop_ids = (3,)
    vocab_size = 512


def _student_pair(capacity_factor: float, pad: bool):
    """(a student built with --moe-expert-capacity-factor, the same weights built without)."""
    from megatron_ext.model import build_stage

    torch.manual_seed(5)
    dropping, _ = build_stage(_tiny(), ModelOptions(moe=MoEOptions(
        expert_capacity_factor=capacity_factor, pad_expert_input_to_capacity=pad)))
    dropless, _ = build_stage(_tiny(), ModelOptions())
    dropless.load_state_dict(dropping.state_dict())
    return dropping, dropless


@pytest.mark.parametrize("pad", [False, True])
def test_rollouts_of_a_capacity_factor_student_are_dropless(pad, megatron_single_rank,
                                                            fresh_moe_tracker):
    """OPD rollouts (16 rows, greedy through top-k 1) of a student trained with a capacity
    factor equal those of the same weights without one; the factor is back afterwards."""
    from megatron_ext.posttrain import rollout

    dropping, dropless = _student_pair(0.25, pad)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 512, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 12, (16,), generator=g)]
    tokens = torch.tensor([p[:3] for p in prompts])
    positions = torch.arange(3).expand_as(tokens)
    with torch.no_grad():  # the defect: Megatron drops tokens in eval mode too
        assert not torch.allclose(dropping.eval()(tokens, positions, None),
                                  dropless.eval()(tokens, positions, None), atol=1e-4)
    settings = rollout.RolloutSettings(rollout_batch_size=8, n_samples_per_prompt=2,
                                       max_response_len=6, top_k=1)
    rows = list(range(16))
    a = rollout.sample(dropping, prompts, rows, settings, _Tok(), seed=7, per_rank=False)
    b = rollout.sample(dropless, prompts, rows, settings, _Tok(), seed=7, per_rank=False)
    assert [x.output_ids for x in a] == [x.output_ids for x in b]
    assert torch.allclose(torch.tensor([lp for x in a for lp in x.rollout_logprobs]),
                          torch.tensor([lp for x in b for lp in x.rollout_logprobs]), atol=1e-5)
    assert dropping.config.moe_expert_capacity_factor == 0.25
    assert dropping.config.moe_pad_expert_input_to_capacity is pad


# ------------------------------------------------------------------------------ 4. teachers
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, megatron_single_rank):
    """A small qwen3_moe imported as a Megatron checkpoint (softmax router, no bias recorded)."""
    from conftest import load_tool
    from helpers_hf import make_moe_qwen3

    root = tmp_path_factory.mktemp("teacher")
    make_moe_qwen3(str(root / "hf"), seed=4, vocab_size=512, num_experts=8, num_experts_per_tok=2)
    importer = load_tool("import_hf_to_mcore")
    assert importer.main(["--hf-dir", str(root / "hf"), "--save", str(root / "mcore")]) == 0
    return str(root / "mcore")


STUDENT_ROUTERS = {
    "plain": MoEOptions(),
    "sigmoid+bias+capacity": MoEOptions(router_score_function="sigmoid", enable_expert_bias=True,
                                        expert_capacity_factor=0.25),
}


def test_teacher_routes_as_its_checkpoint_records_whatever_the_student_flags(
        teacher_ckpt, megatron_single_rank, fresh_moe_tracker):
    """The same teacher checkpoint scores the same rows the same under a student with Megatron's
    defaults and under one with sigmoid scoring, expert bias and a capacity factor; and equal to
    the checkpoint loaded as a model of its own (inference.loading.load_model_from_checkpoint)."""
    from megatron_ext.inference.loading import load_model_from_checkpoint
    from megatron_ext.posttrain.teachers import MegatronTeacher, TeacherSpec

    spm = "data/tokenizer/marco_tiny_spm.model"
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 512, (16, 9), generator=g)
    positions = torch.arange(9).expand_as(tokens)
    lengths = torch.full((16,), 9)
    scores = {}
    for name, moe in STUDENT_ROUTERS.items():
        teacher = MegatronTeacher(TeacherSpec(teacher_ckpt, "megatron", tokenizer=spm),
                                  ModelOptions(moe=moe), seq_length=16)
        scores[name] = teacher.logits(tokens, positions, lengths)[0]
    reference, _ = load_model_from_checkpoint(teacher_ckpt)
    with torch.no_grad():
        expected = reference.eval()(tokens, positions, None)
    torch.testing.assert_close(scores["plain"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores["sigmoid+bias+capacity"], expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ 8. FP8
def test_an_fp8_student_generates_without_fp8_autocast(monkeypatch, megatron_single_rank,
                                                       fresh_moe_tracker):
    """Rollouts of an FP8 student (config.fp8 set, as --fp8-format sets it) enter no FP8
    context (decode steps feed TE's FP8 GEMMs token counts that are not multiples of 16) and
    equal the bf16 model's; FP8 is back for the training forward afterwards. (On CPU Megatron's
    FP8 context is a null context; the spy sees whether the block would enter TE's.)"""
    from megatron.core.transformer import transformer_block

    from megatron_ext.inference.generation import SamplingParams, generate
    from megatron_ext.model import build_stage

    torch.manual_seed(2)
    model, _ = build_stage(_tiny(), ModelOptions())
    prompts = [[5, 9, 11], [7, 8], [40, 41, 42, 43, 44]]
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    expected = generate(model, prompts, params)
    entered = []
    real = transformer_block.get_fp8_context
    monkeypatch.setattr(transformer_block, "get_fp8_context",
                        lambda config, *a, **k: entered.append(config.fp8) or real(config, *a, **k))
    model.config.fp8 = "hybrid"
    try:
        got = generate(model, prompts, params)
        assert model.config.fp8 == "hybrid"
        model(torch.tensor([[5, 9]]), torch.tensor([[0, 1]]), None)  # a training forward
    finally:
        model.config.fp8 = None
    assert [g.output_ids for g in got] == [g.output_ids for g in expected]
    assert entered == ["hybrid"]  # the training forward's only


def test_an_fp8_students_teacher_scores_without_fp8(teacher_ckpt, megatron_single_rank,
                                                     fresh_moe_tracker):
    from megatron_ext.posttrain.teachers import MegatronTeacher, TeacherSpec

    teacher = MegatronTeacher(TeacherSpec(teacher_ckpt, "megatron",
                                          tokenizer="data/tokenizer/marco_tiny_spm.model"),
                              ModelOptions(fp8_format="hybrid"), seq_length=16)
    assert teacher.model.config.fp8 is None


# ------------------------------------------------------------------------------ 3. CP
@pytest.mark.parametrize("stage", ["sft", "opd"])
def test_context_parallelism_is_refused_for_sft_and_opd_at_parse_time(stage):
    """SFT's packed rows (1-D cu_seqlens) and OPD's variable-width rows (1-D lengths) cannot be
    split along the sequence by the trainer: one line naming the flag, before any process group
    or model exists (the IndexError came from Megatron's get_batch_on_this_cp_rank)."""
    import posttrain_marco
    from megatron_ext.arguments import check_args
    from megatron_ext.errors import LayoutError

    args = posttrain_marco.build_parser().parse_args([stage, "--context-parallel-size", "2"])
    with pytest.raises(LayoutError) as e:
        check_args(args)
    assert str(e.value) == (f"--context-parallel-size 2: {stage} does not support context "
                            "parallelism (packed / variable-length rows); use 1 and scale with "
                            "data, tensor or expert parallelism")


# ------------------------------------------------------------------------------ param gather
@pytest.mark.parametrize("overlap, virtual, aligned", [(True, 2, True), (False, 2, False),
                                                     (True, None, False)])
def test_overlapped_param_gather_is_aligned_with_the_interleaved_schedule(
        overlap, virtual, aligned, megatron_single_rank):
    """Virtual pipeline + --overlap-param-gather: the trainer gives the interleaved schedule
    `param_sync_func`, which dispatches every chunk's all-gathers, so DDP must be built with
    align_param_gather (Megatron-LM's pairing); the other schedules never call it."""
    from megatron_ext.config import OptimizerOptions
    from megatron_ext.model import build_stage
    from megatron_ext.optim import wrap_ddp

    model, config = build_stage(dataclasses.replace(get_preset("tiny-dense"), vocab_size=512),
                                ModelOptions())
    config.virtual_pipeline_model_parallel_size = virtual  # as a VPP layout's config has it
    opts = OptimizerOptions(use_distributed_optimizer=True, overlap_grad_reduce=overlap,
                            overlap_param_gather=overlap)
    assert wrap_ddp(model, config, opts).ddp_config.align_param_gather is aligned


# ------------------------------------------------------------------------------ 7. KV cache
def test_compaction_keeps_rows_in_the_same_cache_buffers(megatron_single_rank, fresh_moe_tracker):
    """Dropping finished rows moves the kept ones to the front of the cache buffers in place
    (no second cache: at 16 rows x 10k tokens the copy was up to 13 GiB), and decoding goes on
    exactly as with a fresh cache (tests/test_generation.py compares with full recompute)."""
    from megatron_ext.inference import generation
    from megatron_ext.model import build_stage

    torch.manual_seed(3)
    model, _ = build_stage(_tiny(), ModelOptions())
    pad = torch.zeros(4, 12, dtype=torch.bool)
    with torch.no_grad(), generation._inference_layout(model):
        steps = generation._CachedSteps(model, 4, 12, pad)
        steps.prefill(torch.randint(4, 512, (4, 5)))
        before = {layer: (k.clone(), k.untyped_storage().data_ptr())
                  for layer, (k, _) in steps.buffers.items()}
        rows = torch.tensor([3, 1])
        steps.keep(rows)
        for layer, (k, _) in steps.buffers.items():
            old, ptr = before[layer]
            assert k.untyped_storage().data_ptr() == ptr and k.shape[0] == 2
            assert torch.equal(k[:, :, :5], old.index_select(0, rows)[:, :, :5])


def _memory_estimate():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("memory_estimate",
                                                  REPO / "slurm" / "memory_estimate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_estimate_prints_the_shipped_opd_layouts_and_they_fit(capsys):
    """`python slurm/memory_estimate.py`: one OPD line per shipped layout (Nano, Mini: EP 8,
    16 rows of 2,048 + 8,192 tokens, Qwen3-30B-A3B beside the student), each under an H100's
    80 GB with 10% margin and CUDA/NCCL included; the parts are the docstring's arithmetic."""
    me = _memory_estimate()
    assert me.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" OPD:")[0] for line in lines] == ["nano", "mini"]
    for line in lines:
        assert line.endswith("fits in 90% of an H100's 79.6 GiB"), line
    mini = me.shipped_opd("mini")
    # 16 rows x 10,240 positions x 28 layers x 2 (K, V) x 8 KV heads x 128 x 2 B = 17.5 GiB.
    assert mini["rollout_kv_cache_gib"] == pytest.approx(16 * 10240 * 28 * 2 * 8 * 128 * 2 / 2**30)
    assert mini["rollout_kv_cache_gib"] == pytest.approx(17.5)
    assert mini["teacher_weights_gib"] == pytest.approx(9.6, abs=0.05)  # 5.2B bf16 at EP 8
    assert mini["with_context_gib"] < 0.9 * 79.6
    assert me.shipped_opd("nano")["with_context_gib"] < mini["with_context_gib"]
    # The full-vocabulary losses keep the teacher's logits beside the training micro-batch.
    jsd = me.estimate_opd("mini", 8, 64, loss="jsd")
    assert jsd["training_teacher_logits_gib"] == pytest.approx(
        (10240 * 151936 * 2 + 1024 * 151936 * 8) / 2**30)


def test_memory_estimate_refuses_an_opd_layout_that_does_not_fit(capsys):
    me = _memory_estimate()
    assert me.main(["opd", "--preset", "mini", "--ep", "8", "--dp", "64", "--decode-rows", "96",
                    "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: mini OPD: EP 8, DP 64, 96 rows x 10240 tokens")
    assert "does NOT fit" in err and "MARCO_OPD_DECODE_BATCH" in err
    assert me.main(["opd", "--preset", "mini", "--ep", "8", "--dp", "64", "--check"]) == 0


def test_opd_sbatch_refuses_a_layout_that_does_not_fit(tmp_path):
    import subprocess

    from conftest import REPO, subprocess_env

    env = subprocess_env(QWEN3_30B_A3B_MCORE="/ckpt/qwen3-30b", MARCO_DRY_RUN="1",
                         QWEN3_NEXT_80B_A3B="http://teacher-node:8000", MARCO_OUTPUT=str(tmp_path),
                         MARCO_OPD_DECODE_BATCH="96")
    run = subprocess.run(["bash", str(REPO / "slurm/mini_opd.sbatch")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("posttrain.sh: error: mini OPD: EP 8, DP 64, 96 rows")
    assert len(run.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ 6. TE masks
class _TEMaskSemantics(torch.nn.Module):
    """A core attention with TransformerEngine's documented mask semantics (DotProductAttention):
    `causal` and `no_mask` ignore `attention_mask`; `padding` / `padding_causal` take padding
    masks (True = padded), one [b, 1, 1, s] tensor for self-attention or a (query, key) pair,
    and give padded queries a zero output; `causal` is aligned top-left. Plain fp32 math."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **_):
        q, k, v = (t.permute(1, 2, 0, 3).float() for t in (query, key, value))  # [b, h, s, d]
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        sq, skv = q.shape[2], k.shape[2]
        kind = attn_mask_type.name
        masked = torch.zeros(1, 1, sq, skv, dtype=torch.bool)
        q_pad = torch.zeros(q.shape[0], 1, sq, 1, dtype=torch.bool)
        if kind in ("causal", "padding_causal"):
            masked = masked | (torch.arange(skv)[None, :] > torch.arange(sq)[:, None])
        if kind.startswith("padding"):
            q_mask, kv_mask = (attention_mask if isinstance(attention_mask, tuple)
                               else (attention_mask, attention_mask))
            masked = masked | kv_mask
            q_pad = q_mask.transpose(-1, -2)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        probs = scores.masked_fill(masked, float("-inf")).softmax(-1).nan_to_num(0.0)
        out = (probs @ v).masked_fill(q_pad, 0.0)
        return out.permute(2, 0, 1, 3).reshape(sq, q.shape[0], -1).to(query.dtype)


def test_left_padded_generation_on_te_shaped_attention_equals_sdpa(monkeypatch, megatron_single_rank,
                                                                    fresh_moe_tracker):
    """Left-padded prompts (prefill and decode steps): an attention that reads masks as
    TransformerEngine does generates what our SDPA attention generates (ids, log-probs), once
    generation hands it the padding in TE's terms; handed Megatron's causal / no_mask types
    as before, it attended to the padding and its log-probs differed."""
    import contextlib

    from megatron.core.transformer.attention import Attention

    from megatron_ext.inference import generation
    from megatron_ext.inference.generation import SamplingParams, generate
    from megatron_ext.model import build_stage

    torch.manual_seed(6)
    model, config = build_stage(_tiny(), ModelOptions())
    prompts = [[5, 9, 11, 40, 41, 42, 43], [7, 8], [60, 61, 62, 63]]
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    sdpa = generate(model, prompts, params)
    for m in model.modules():
        if isinstance(m, Attention):
            m.core_attention = _TEMaskSemantics(1.0 / config.kv_channels ** 0.5)
    te = generate(model, prompts, params)
    assert [g.output_ids for g in te] == [g.output_ids for g in sdpa]
    torch.testing.assert_close(torch.tensor([lp for g in te for lp in g.logprobs]),
                               torch.tensor([lp for g in sdpa for lp in g.logprobs]),
                               atol=1e-4, rtol=0)
    monkeypatch.setattr(generation, "te_padding_masks", lambda m: contextlib.nullcontext())
    unmasked = generate(model, prompts, params)
    gap = max(abs(a - b) for x, y in zip(unmasked, sdpa) for a, b in zip(x.logprobs, y.logprobs))
    assert gap > 1e-3  # the defect: the padding was attended to


# ------------------------------------------------------------------------------ SDPA kernels
def test_sdpa_with_a_mask_and_grouped_heads_repeats_kv_on_cuda(monkeypatch):
    """Mask + GQA has no fused CUDA kernel (math fallback: [b, heads, s, s] scores), so on CUDA
    SDPAttention repeats K/V per query head; the attention is the same (here on CPU, with the
    tensors posing as CUDA ones), and without a mask or on CPU K/V stay grouped."""
    import torch.nn.functional as F

    from megatron_ext import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 6, 8, generator=g) for h in (4, 2, 2))
    keep = torch.rand(2, 1, 6, 6, generator=g) > 0.3
    keep |= torch.eye(6, dtype=torch.bool)
    k2, v2, gqa = attention._grouped_kv(q, k, v, keep)
    assert gqa and k2 is k  # CPU: grouped (its fused kernel takes both)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    k2, v2, gqa = attention._grouped_kv(q, k, v, keep)
    assert not gqa and k2.shape[1] == 4
    assert attention._grouped_kv(q, k, v, None)[2]  # no mask: flash takes GQA
    monkeypatch.undo()
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k2, v2, attn_mask=keep),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                                              enable_gqa=True))


def test_tp_comm_overlap_is_refused_for_opd_at_parse_time():
    """TE's userbuffers are sized for one sequence length; OPD rows and decode steps vary."""
    import posttrain_marco
    from megatron_ext.arguments import check_args
    from megatron_ext.errors import LayoutError

    args = posttrain_marco.build_parser().parse_args(["opd", "--tp-comm-overlap"])
    with pytest.raises(LayoutError, match="^--tp-comm-overlap: opd does not support it"):
        check_args(args)
