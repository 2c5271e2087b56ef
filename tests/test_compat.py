"""Which Megatron-Core fixes and CPU adaptations are installed, on which condition.

The defect guarded against: the fixes for Megatron-Core without TransformerEngine/apex (the
missing `te_general_gemm` name, the distributed optimizer's torch-Adam 'step' on load) were
installed only when CUDA was absent, so a GPU without TE raised NameError in every MoE router
forward. `mcore_fixes.plan` decides per (CUDA?, TE?, a fused Adam?, Megatron-Core version).
"""

import json
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

from megatron_ext import mcore_fixes
from megatron_ext.mcore_fixes import Environment

ALL_MCORE = ["te_general_gemm_name", "dist_optimizer_torch_adam_step", "dist_optimizer_fp32_load",
             "checkpoint_without_output_fp8", "moe_aux_loss_tp_scale"]


@pytest.mark.parametrize("env, expected", [
    # CPU, no TE/apex, the pinned release: every fix, then the CPU adaptations.
    (Environment(False, False, False, "0.16.1"), [*ALL_MCORE, "cpu_compat"]),
    # A GPU without TE (the torch-grouped backend's GPU): the same fixes, no CPU adaptation.
    (Environment(True, False, False, "0.16.1"), ALL_MCORE),
    (Environment(True, False, False, "0.16.0rc0"), ALL_MCORE),
    # A GPU with TE: TE's FusedAdam has no per-parameter 'step'; the name is bound. The
    # router's aux-loss scale under TP is wrong whatever is installed.
    (Environment(True, True, True, "0.16.1"), ["dist_optimizer_fp32_load",
                                               "moe_aux_loss_tp_scale"]),
    # TE imports but neither its FusedAdam nor apex's does (Megatron's HAVE_APEX_OR_TE False):
    # torch's Adam runs inside the distributed optimizer, so its 'step' fix applies.
    (Environment(True, True, False, "0.16.1"), ["dist_optimizer_torch_adam_step",
                                                "dist_optimizer_fp32_load",
                                                "moe_aux_loss_tp_scale"]),
    # apex's FusedAdam but no TE: the TE names are still missing.
    (Environment(True, False, True, "0.16.1"),
     ["te_general_gemm_name", "dist_optimizer_fp32_load", "checkpoint_without_output_fp8",
      "moe_aux_loss_tp_scale"]),
    # 0.17 binds te_general_gemm = None itself; the optimizer code is unchanged there.
    (Environment(True, False, False, "0.17.0"), ALL_MCORE[1:]),
    # 0.19 scales the router's aux losses by TP x CP itself (Megatron-LM #5047).
    (Environment(True, True, True, "0.19.0"), ["dist_optimizer_fp32_load"]),
    # Releases outside those read: nothing is assumed about them.
    (Environment(False, False, False, "0.20.0"), ["cpu_compat"]),
    (Environment(True, True, True, "0.15.3"), []),
])
def test_plan_selects_fixes_by_condition(env, expected):
    assert mcore_fixes.plan(env) == expected


def test_installed_here_is_what_the_plan_says(megatron_single_rank):
    from megatron.core.transformer.moe import moe_utils

    env = mcore_fixes.current_environment()
    assert env.cuda is False and env.have_te is False  # this CPU suite's machine
    assert mcore_fixes.installed() == sorted(mcore_fixes.plan(env))
    assert moe_utils.te_general_gemm is None
    from megatron.core.tensor_parallel import CheckpointWithoutOutput

    assert CheckpointWithoutOutput().fp8 is False and CheckpointWithoutOutput(fp8="e4m3").fp8
    from megatron.core.transformer.moe.router import TopKRouter

    assert hasattr(TopKRouter.apply_z_loss, "__wrapped__")


_GPU_WITHOUT_TE = """
import json, torch
torch.cuda.is_available = lambda: True   # what a GPU without TransformerEngine reports
from megatron_ext import cpu_compat, mcore_fixes
names = mcore_fixes.install()
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.transformer.moe import moe_utils
# The call that raised NameError in every MoE forward without TE (the router's gating GEMM).
out = moe_utils.router_gating_linear(torch.ones(3, 4), torch.ones(2, 4), None, torch.float32)
print(json.dumps({"names": names, "cpu_shims": cpu_compat._enabled,
                  "router_out": out.tolist(),
                  "optimizer_patched": hasattr(DistributedOptimizer.load_state_dict, "__wrapped__")}))
"""


def test_gpu_without_te_gets_the_fixes_and_no_cpu_shims():
    run = subprocess.run([sys.executable, "-c", _GPU_WITHOUT_TE], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["names"] == ALL_MCORE
    assert result["cpu_shims"] is False
    assert result["optimizer_patched"] is True
    assert result["router_out"] == [[4.0, 4.0]] * 3


# ----------------------------------------------------------------------------- routing recorder
def test_routing_hook_accumulates_on_the_router_device():
    """The hook must not copy to the host (a GPU sync per layer per micro-batch). A routing map
    on the meta device cannot be copied out: the old hook's `.to("cpu")` raised here."""
    import torch

    from megatron_ext.routing import RoutingRecorder

    recorder = RoutingRecorder([], num_layers=2, num_experts=4)
    recorder._hook(1)(None, (), (None, torch.ones(5, 4, dtype=torch.bool, device="meta")))
    assert recorder._counts["train"].device.type == "meta"
    # On CPU tensors the counts are exact, and `totals` makes the one host copy.
    recorder.reset()
    routing = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    for _ in range(2):
        recorder._hook(0)(None, (), (None, routing))
    assert recorder.totals("train").tolist() == [[4.0, 2.0, 0.0, 4.0], [0.0] * 4]
    assert recorder.imbalance()[0] == 4.0 / 2.5


# ----------------------------------------------------------------------------- _extra_state
class _FakeFP8Meta:
    """What TransformerEngine's modules add to a state dict: an `_extra_state` entry (FP8
    metadata as a byte tensor) that the non-TE spec's modules do not have."""

    def get_extra_state(self):
        return getattr(self, "_fake_meta", torch.zeros(0, dtype=torch.uint8))

    def set_extra_state(self, state):
        self._fake_meta = state


def _te_like_provider():
    """The local spec with TE-like norms (q/k, pre-MLP, final) and core attention that carry
    `_extra_state`, as TE's standalone norms and TEDotProductAttention do."""
    from megatron_ext import attention, layer_spec

    class Norm(_FakeFP8Meta, layer_spec.RMSNorm):
        pass

    class CoreAttention(_FakeFP8Meta, attention.SDPAttention):
        pass

    class Provider(layer_spec.MarcoLocalSpecProvider):
        def layer_norm(self, rms_norm=False, for_qk=False):
            return Norm

        def core_attention(self):
            return CoreAttention

    return Provider


import torch  # noqa: E402


def _logits(model, preset):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, preset.vocab_size, (2, 16), generator=g)
    with torch.no_grad():
        return model(tokens, torch.arange(16).expand(2, 16), None)


def test_checkpoints_of_the_two_specs_load_into_each_other(megatron_single_rank, fresh_moe_tracker,
                                                           tmp_path, monkeypatch):
    from megatron_ext import checkpointing, layer_spec
    from megatron_ext.errors import CheckpointError
    from megatron_ext.model import build_model, marco_config
    from megatron_ext.presets import get_preset, override

    preset = override(get_preset("tiny"), num_layers=1)
    info = checkpointing.model_info(preset)

    def build(te_like: bool, seed: int, p=preset):
        torch.manual_seed(seed)
        if te_like:
            provider = _te_like_provider()
            with monkeypatch.context() as m:
                m.setattr(layer_spec, "_provider", lambda backend, use_te: provider())
                return build_model(p, marco_config(p), "sequential")
        return build_model(p, marco_config(p), "sequential")

    local = build(False, seed=0)
    checkpointing.save_checkpoint(str(tmp_path / "local"), checkpointing.TrainState(), [local],
                                  model_info=info)
    # non-TE checkpoint -> TE-like model (failed before: missing `_extra_state` entries)
    te_like = build(True, seed=1)
    assert sum(k.endswith("_extra_state") for k in te_like.state_dict()) > sum(
        k.endswith("_extra_state") for k in local.state_dict())
    checkpointing.load_checkpoint(str(tmp_path / "local"), [te_like], load_rng=False)
    assert torch.equal(_logits(te_like, preset), _logits(local, preset))

    # TE-like checkpoint (with FP8-like metadata) -> non-TE model, and back into a TE-like one.
    meta = torch.arange(7, dtype=torch.uint8)
    te_like.decoder.final_layernorm.set_extra_state(meta)
    checkpointing.save_checkpoint(str(tmp_path / "te"), checkpointing.TrainState(), [te_like],
                                  model_info=info)
    local2 = build(False, seed=2)
    checkpointing.load_checkpoint(str(tmp_path / "te"), [local2], load_rng=False)
    assert torch.equal(_logits(local2, preset), _logits(te_like, preset))
    te_like2 = build(True, seed=3)
    checkpointing.load_checkpoint(str(tmp_path / "te"), [te_like2], load_rng=False)
    assert torch.equal(te_like2.decoder.final_layernorm.get_extra_state(), meta)

    # Only `_extra_state` is optional: a missing weight is still an error naming the checkpoint.
    deeper = build(False, seed=4, p=override(preset, num_layers=2))
    with pytest.raises(CheckpointError, match="does not match this model"):
        checkpointing.load_checkpoint(str(tmp_path / "local"), [deeper], load_rng=False)


# ----------------------------------------------------------------------------- bench/gpu_check.sh
def test_gpu_check_script_is_clean_and_dry_runs_on_cpu(tmp_path):
    import shutil

    script = str(REPO / "bench" / "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    lint = subprocess.run([shutil.which("shellcheck"), "--severity=style", script],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    out = tmp_path / "out"
    run = subprocess.run(["bash", script, str(out), "--wheels", str(wheels), "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    steps = [line.split("]")[0][3:].split(",")[0] for line in lines if line.startswith("+ [")]
    assert steps == ["environment", "install-wheels", "install-project", "imports", "train",
                     "generate", "evaluate", "sft-step", "opd-step", "gpu-tests", "summary"]
    assert any("pip install" in line and "--no-index --no-deps" in line
               and "megatron_core-0.16.1-cp312" in line for line in lines)
    assert any("-m pytest -m gpu tests/test_gpu.py" in line for line in lines)
    # What a user runs on a GPU: generation and evaluation of the checkpoint trained in the
    # check, a bf16 SFT step and a bf16 OPD step with that checkpoint as in-process teacher.
    by_step = {line.split("]")[0][3:].split(",")[0]: line for line in lines if line.startswith("+ [")}
    ckpt = "/tmp/marco-gpu-check/ckpt"
    assert "pretrain_marco.py --preset tiny --bf16" in by_step["train"] and ckpt in by_step["train"]
    assert f"tools/generate.py --load {ckpt}" in by_step["generate"]
    assert f"tools/evaluate.py --load {ckpt}" in by_step["evaluate"]
    assert "posttrain_marco.py sft" in by_step["sft-step"] and "--bf16" in by_step["sft-step"]
    assert (f"posttrain_marco.py opd --load /tmp/marco-gpu-check/sft --teacher {ckpt}"
            in by_step["opd-step"] and "--bf16" in by_step["opd-step"])
    limits = [int(line.split("<= ")[1].split("s]")[0]) for line in lines if "<= " in line]
    assert sum(limits) <= 6 * 60, limits  # install included
    assert not out.exists()  # a dry run writes nothing
    bench = subprocess.run(["bash", script, str(out), "--bench", "--dry-run"],
                           capture_output=True, text=True, timeout=60)
    assert any("bench_gpu_nano_slice.py" in line and "--rows sequential torch-grouped hf" in line
               for line in bench.stdout.splitlines())
    bad = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage: bash bench/gpu_check.sh OUTDIR" in bad.stderr
