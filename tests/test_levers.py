"""The H100 levers (Megatron-LM flag names; docs/cluster.md "Levers"), and the distributed
optimizer's deferred parameter all-gather (issue 18, 1.6), on CPU.

- every flag reaches Megatron's TransformerConfig as Megatron-LM's flag would (no process);
- every unusable combination is one line naming the flag, at parse time;
- where the path runs on CPU, a short training run (tests/parallel_harness.py: one launch of
  one process and one of two for all runs): expert-bias balancing moves the biases by
  exactly the update rate per step; capacity-factor routing never gives an expert more than
  its capacity; seq_aux_loss and global_aux_loss log their own balancing loss; selective
  recompute (core_attn, layernorm, moe_act, moe) trains what no recompute trains (the same
  losses; weights to float rounding);
  an interleaved pipeline (PP = 2 x 2 virtual stages) trains what one process trains; the
  MoE all-to-all overlap (EP = 2) trains what the plain schedule trains; and a
  `--overlap-param-gather` run saves the parameters of its last step (it saved the
  previous step's before the forced sync).
Not on CPU (TransformerEngine or a GPU needed; tests/test_gpu.py): --moe-permute-fusion,
--context-parallel-size, --tp-comm-overlap, --cross-entropy-fusion-impl te; and
--cross-entropy-loss-fusion trains only in config here (its kernel compiles for ~90 s on CPU).
"""

from __future__ import annotations

import math

import parallel_harness as H
import pytest
import torch

from megatron_ext.errors import ConfigError, LayoutError

TINY = ["--preset", "tiny", "--num-layers", "4", "--seq-length", "128"]
GBS8 = "--global-batch-size=8"  # 2 micro-batches of 4: what PP = 2 interleaving needs


def _config(argv, monkeypatch, world=1):
    from megatron_ext.arguments import parse_args
    from megatron_ext.model import marco_config

    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = parse_args([*TINY, *argv])
    return cfg, marco_config(cfg.model, cfg.layout, cfg.model_options)


@pytest.mark.parametrize("argv, world, expected", [
    ([], 1, dict(moe_router_dtype="fp32", moe_router_load_balancing_type="aux_loss",
                 moe_router_score_function="softmax", moe_router_enable_expert_bias=False,
                 moe_expert_capacity_factor=None, moe_pad_expert_input_to_capacity=False,
                 moe_permute_fusion=False, cross_entropy_loss_fusion=False,
                 overlap_moe_expert_parallel_comm=False, context_parallel_size=1,
                 virtual_pipeline_model_parallel_size=None, tp_comm_overlap=False)),
    (["--moe-router-dtype", "fp64"], 1, dict(moe_router_dtype="fp64")),
    (["--moe-router-load-balancing-type", "seq_aux_loss"], 1,
     dict(moe_router_load_balancing_type="seq_aux_loss")),
    (["--moe-router-load-balancing-type", "global_aux_loss"], 1,
     dict(moe_router_load_balancing_type="global_aux_loss")),
    (["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
      "--moe-router-bias-update-rate", "0.01"], 1,
     dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
          moe_router_bias_update_rate=0.01)),
    (["--moe-expert-capacity-factor", "1.25", "--moe-pad-expert-input-to-capacity",
      "--moe-token-drop-policy", "position"], 1,
     dict(moe_expert_capacity_factor=1.25, moe_pad_expert_input_to_capacity=True,
          moe_token_drop_policy="position")),
    (["--recompute-granularity", "selective", "--moe-expert-backend", "torch-grouped",
      "--recompute-modules", "moe_act", "layernorm"], 1,
     dict(recompute_granularity="selective", recompute_modules=["moe_act", "layernorm"])),
    (["--recompute-granularity", "selective"], 1, dict(recompute_modules=["core_attn"])),
    (["--cross-entropy-loss-fusion"], 1,
     dict(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native")),
    (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2", GBS8], 2,
     dict(virtual_pipeline_model_parallel_size=2, overlap_p2p_comm=True, batch_p2p_comm=False)),
    (["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2", GBS8], 2,
     dict(virtual_pipeline_model_parallel_size=2)),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", GBS8], 2,
     dict(virtual_pipeline_model_parallel_size=2)),
    (["--pipeline-model-parallel-size", "2"], 2,
     dict(virtual_pipeline_model_parallel_size=None, batch_p2p_comm=True)),
    (["--expert-model-parallel-size", "2", "--bf16", "--overlap-moe-expert-parallel-comm"], 2,
     dict(overlap_moe_expert_parallel_comm=True, moe_token_dispatcher_type="alltoall")),
])
def test_lever_flags_reach_the_transformer_config(argv, world, expected, monkeypatch):
    _, config = _config(argv, monkeypatch, world)
    assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize("argv, world, error, message", [
    (["--moe-router-enable-expert-bias"], 1, ConfigError,
     "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid"),
    (["--moe-pad-expert-input-to-capacity"], 1, ConfigError,
     "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor"),
    (["--moe-expert-capacity-factor", "0"], 1, ConfigError, "--moe-expert-capacity-factor 0.0: must be > 0"),
    (["--moe-router-bias-update-rate", "nan"], 1, ConfigError, "--moe-router-bias-update-rate nan"),
    (["--moe-permute-fusion"], 1, ConfigError, "--moe-permute-fusion needs TransformerEngine"),
    (["--recompute-modules", "moe"], 1, ConfigError,
     "--recompute-modules needs --recompute-granularity selective"),
    (["--recompute-granularity", "selective", "--recompute-modules", "moe_act",
      "--moe-expert-backend", "sequential"], 1, ConfigError, "moe_act needs a grouped expert backend"),
    (["--context-parallel-size", "2"], 2, ConfigError,
     "--context-parallel-size 2 needs TransformerEngine's attention"),
    (["--tp-comm-overlap"], 1, ConfigError, "--tp-comm-overlap needs TransformerEngine"),
    (["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te"], 1, ConfigError,
     "--cross-entropy-fusion-impl te needs TransformerEngine"),
    (["--overlap-moe-expert-parallel-comm", "--bf16"], 1, ConfigError,
     "--overlap-moe-expert-parallel-comm needs --expert-model-parallel-size > 1"),
    (["--overlap-moe-expert-parallel-comm", "--expert-model-parallel-size", "2"], 2, ConfigError,
     "--overlap-moe-expert-parallel-comm needs bf16"),
    (["--overlap-moe-expert-parallel-comm", "--expert-model-parallel-size", "2", "--bf16",
      "--moe-token-dispatcher-type", "allgather"], 2, ConfigError,
     "needs --moe-token-dispatcher-type alltoall"),
    (["--overlap-param-gather", "--use-distributed-optimizer"], 1, ConfigError,
     "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce"),
    (["--num-virtual-stages-per-pipeline-rank", "2"], 1, LayoutError,
     "needs --pipeline-model-parallel-size >= 2"),
    (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "3"], 2,
     LayoutError, "4 layers of preset 'tiny' are not divisible by --pipeline-model-parallel-size 2 x "
                  "--num-virtual-stages-per-pipeline-rank 3"),
    (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
      "--micro-batch-size", "2", "--global-batch-size", "2"], 2, LayoutError,
     "micro-batches per step (1 = --global-batch-size"),
])
def test_unusable_levers_are_one_line_errors(argv, world, error, message, monkeypatch):
    with pytest.raises(error) as e:
        _config(argv, monkeypatch, world)
    assert message in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- training runs
BIAS_RATE = 0.01
STEPS = 3
TWO_LAYERS = {  # name -> flags (the harness's 2-layer tiny MoE, 4 micro-batches per step)
    "ref_grouped": ["--moe-expert-backend", "torch-grouped"],
    "recompute": ["--moe-expert-backend", "torch-grouped", "--recompute-granularity", "selective",
                  "--recompute-modules", "core_attn", "layernorm", "moe_act", "moe"],
    "expert_bias": ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                    "--moe-router-bias-update-rate", str(BIAS_RATE)],
    "capacity": ["--moe-expert-capacity-factor", "1.0"],
    "capacity_padded": ["--moe-expert-capacity-factor", "1.0", "--moe-pad-expert-input-to-capacity"],
    "seq_aux": ["--moe-router-load-balancing-type", "seq_aux_loss"],
    "global_aux": ["--moe-router-load-balancing-type", "global_aux_loss"],
}
FOUR_LAYERS = ["--num-layers", "4"]
TWO_RANKS = {
    "vpp": [*FOUR_LAYERS, "--pipeline-model-parallel-size", "2",
            "--num-virtual-stages-per-pipeline-rank", "2"],
    "distopt": ["--use-distributed-optimizer"],
    "distopt_overlap": ["--use-distributed-optimizer", "--overlap-grad-reduce",
                        "--overlap-param-gather"],
    "ep2": ["--expert-model-parallel-size", "2", "--bf16"],
    "ep2_overlap": ["--expert-model-parallel-size", "2", "--bf16",
                    "--overlap-moe-expert-parallel-comm"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("levers")
    init2, init4 = str(work / "init2"), str(work / "init4")
    one = [H.start_checkpoint_job(init2),
           {"kind": "init", "name": "init4", "path": init4, "args": [*TINY[:2], *H.COMMON, *FOUR_LAYERS]},
           H.train_job("ref", [], work, load=init2, train_iters=STEPS, grads=False),
           H.train_job("ref4", FOUR_LAYERS, work, load=init4, train_iters=STEPS, grads=False),
           *(H.train_job(n, f, work, load=init2, train_iters=STEPS, grads=False)
             for n, f in TWO_LAYERS.items())]
    results = H.launch(one, 1, work)
    two = [H.train_job(n, f, work, load=init4 if n == "vpp" else init2, train_iters=STEPS,
                       grads=False) for n, f in TWO_RANKS.items()]
    results.update(H.launch(two, 2, work))
    return work, results


def _state(path):
    return H._full_state(str(path))


@pytest.mark.slow
def test_levers_train_on_cpu(runs, megatron_single_rank, fresh_moe_tracker):
    work, r = runs
    for name in [*TWO_LAYERS, *TWO_RANKS]:
        assert all(math.isfinite(x) for x in r[name]["losses"]), name
        assert r[name]["losses"][-1] < r[name]["losses"][0], name

    # Selective recompute changes memory, not the model: the same losses, and the same weights
    # up to the summation order of the recomputed backward (measured 8e-7 relative).
    assert r["recompute"]["losses"] == r["ref_grouped"]["losses"]
    ref, recomputed = _state(work / "ref_grouped"), _state(work / "recompute")
    for k in ref:
        assert (recomputed[k] - ref[k]).norm() <= 1e-5 * ref[k].norm() + 1e-12, k

    # seq/global aux losses are their own formulas, logged as the run's balancing loss.
    for name in ("seq_aux", "global_aux"):
        lb = r[name]["load_balancing_loss"]
        assert None not in lb and lb != r["ref"]["load_balancing_loss"], name

    # Capacity factor 1.0: per micro-batch an expert takes at most 2 x 128 x top-4 / 16 = 64
    # tokens, 4 x 64 per step; the dropless reference gives some expert more.
    cap = 4 * 64
    assert max(max(map(max, s["tokens_per_expert"])) for s in r["ref"]["routing"]) > cap
    for name in ("capacity", "capacity_padded"):
        assert max(max(map(max, s["tokens_per_expert"])) for s in r[name]["routing"]) <= cap, name


@pytest.mark.slow
def test_expert_bias_moves_by_the_update_rate(runs, megatron_single_rank, fresh_moe_tracker):
    """Each global batch moves every expert's bias by +-rate (sign of its load deficit): after
    3 steps each bias is an odd multiple of the rate. The checkpoint holds them; a model
    without expert-bias routing refuses it (its routing would silently change)."""
    from megatron_ext import checkpointing
    from megatron_ext.config import ModelOptions, MoEOptions
    from megatron_ext.errors import CheckpointError
    from megatron_ext.model import build_stage

    work, _ = runs
    path = str(work / "expert_bias")
    preset = checkpointing.preset_from_checkpoint(path)
    options = ModelOptions(moe=MoEOptions(router_score_function="sigmoid", enable_expert_bias=True))
    model, _ = build_stage(preset, options)
    checkpointing.load_checkpoint(path, [model], load_rng=False)
    for layer in model.decoder.layers:
        steps = layer.mlp.router.expert_bias / BIAS_RATE
        assert torch.allclose(steps, steps.round(), atol=1e-4)
        assert set(steps.round().abs().long().tolist()) <= {1, 3}
    plain, _ = build_stage(preset, ModelOptions())
    with pytest.raises(CheckpointError, match="expert biases"):
        checkpointing.load_checkpoint(path, [plain], load_rng=False)
    # The other way round is allowed: bias balancing starts from a checkpoint without biases.
    fresh, _ = build_stage(preset, options)
    checkpointing.load_checkpoint(str(work / "init2"), [fresh], load_rng=False)
    assert all(float(layer.mlp.router.expert_bias.abs().sum()) == 0 for layer in fresh.decoder.layers)


@pytest.mark.slow
def test_interleaved_pipeline_trains_what_one_process_trains(runs, megatron_single_rank,
                                                             fresh_moe_tracker):
    work, r = runs
    assert r["vpp"]["losses"] == pytest.approx(r["ref4"]["losses"], rel=1e-5)
    ref, vpp = _state(work / "ref4"), _state(work / "vpp")
    for k in ref:
        assert (vpp[k] - ref[k]).norm() <= 1e-5 * ref[k].norm() + 1e-12, k


@pytest.mark.slow
def test_overlapped_param_gather_saves_the_last_steps_weights(runs, megatron_single_rank,
                                                               fresh_moe_tracker):
    """The all-gather of the updated parameters is deferred to the next forward; the save
    after the last step forces it, so the checkpoint equals the non-overlapped run's."""
    work, r = runs
    assert r["distopt_overlap"]["losses"] == r["distopt"]["losses"]
    plain, overlapped = _state(work / "distopt"), _state(work / "distopt_overlap")
    assert all(torch.equal(plain[k], overlapped[k]) for k in plain)


@pytest.mark.slow
def test_moe_all_to_all_overlap_trains_what_the_plain_schedule_trains(runs):
    _, r = runs
    # bf16, two expert-parallel ranks: the combined 1F1B schedule reorders the same work.
    assert r["ep2_overlap"]["losses"] == pytest.approx(r["ep2"]["losses"], rel=1e-4)


# ----------------------------------------------------------------------------- memory estimate
def _estimator():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("memory_estimate", REPO / "slurm" / "memory_estimate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.estimate


def test_memory_estimate_learns_the_levers():
    """Each lever changes exactly the terms it should, by the arithmetic of its docstring."""
    estimate = _estimator()
    base = dict(preset_name="mini", ep=8, dp=64, micro_batch_size=1, seq_length=8192)
    plain = estimate(**base)
    h, F, k = 1024, 768, 8
    tokens_layers = 8192 * plain["layers"] / 2**30  # GiB per byte of per-token-layer storage

    # CP 2: each GPU holds half of every sequence, and the optimizer shards over DP x CP.
    cp = estimate(**base, cp=2)
    for part in ("activations_dense_gib", "activations_experts_gib", "logits_gib"):
        assert cp[part] == pytest.approx(plain[part] / 2)
    assert cp["optimizer_gib"] == pytest.approx(plain["optimizer_gib"] / 2)
    assert cp["weights_bf16_gib"] == plain["weights_bf16_gib"]

    # Selective recompute: moe_act drops the SwiGLU output (k x 2F B), layernorm two norm outputs.
    sel = estimate(**base, recompute="selective", recompute_modules=["moe_act", "layernorm"])
    assert plain["activations_experts_gib"] - sel["activations_experts_gib"] == pytest.approx(
        tokens_layers * k * 2 * F)
    assert plain["activations_dense_gib"] - sel["activations_dense_gib"] == pytest.approx(
        tokens_layers * 4 * h)
    moe = estimate(**base, recompute="selective", recompute_modules=["moe"])
    assert moe["activations_experts_gib"] == 0
    full = estimate(**base, recompute="full")
    assert full["total_gib"] < moe["total_gib"] < plain["total_gib"]

    # Token dropping caps the expert load at the capacity factor; padding makes it exactly that.
    skewed = dict(base, imbalance=2.0)
    assert estimate(**skewed, capacity_factor=1.25)["activations_experts_gib"] == pytest.approx(
        plain["activations_experts_gib"] * 1.25)
    assert estimate(**base, capacity_factor=1.25, pad_to_capacity=True)[
        "activations_experts_gib"] == pytest.approx(plain["activations_experts_gib"] * 1.25)
    assert estimate(**base, capacity_factor=1.25)["activations_experts_gib"] == pytest.approx(
        plain["activations_experts_gib"])

    # PP halves the layers' parameters; interleaving costs (1 + (PP-1)/(PP x VPP)) activations.
    pp = estimate(**dict(base, dp=32), pp=2)
    vpp = estimate(**dict(base, dp=32), pp=2, vpp=2)
    assert pp["expert_params_per_gpu"] == pytest.approx(plain["expert_params_per_gpu"] / 2)
    assert vpp["activations_dense_gib"] == pytest.approx(pp["activations_dense_gib"] * 1.25)
    with pytest.raises(ValueError, match="must divide"):
        estimate(**base, pp=3)
