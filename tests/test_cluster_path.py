"""The cluster user's path (issue 27): what the README and docs promise a new user, checked
in-process: parameter counts in both conventions."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("preset, with_router, without_router, routers", [
    ("mini", 0.868, 0.860, 28 * 256 * 1024),   # the paper: 0.86B active
    ("nano", 0.603, 0.596, 28 * 232 * 1024),   # the paper: 0.6B, Qwen3-0.6B's 0.596B
])
def test_describe_prints_both_parameter_conventions(megatron_single_rank, preset, with_router,
                                                    without_router, routers):
    from megatron_ext.flops import describe
    from megatron_ext.presets import get_preset

    d = describe(get_preset(preset), 4096)
    assert d["router_params"] == routers
    assert d["active_params_billions"] == with_router
    assert d["active_params_without_router_billions"] == without_router
    assert abs(d["active_params"] - d["router_params"] - without_router * 1e9) < 5e5
    assert d["paper_convention"] == "without router"


def test_posttrain_help_shows_the_recipe_and_what_opd_derives():
    import argparse
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("posttrain_marco", REPO / "posttrain_marco.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    top = module.build_parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    opd, sft = (" ".join(subs[k].format_help().split()) for k in ("opd", "sft"))
    assert ("--global-batch-size GLOBAL_BATCH_SIZE rows per optimizer step; default: "
            "--rollout-batch-size x --n-samples-per-prompt") in opd
    assert ("--seq-length SEQ_LENGTH default: the longest --rollout-max-prompt-len + "
            "--rollout-max-response-len") in opd
    assert "micro-batch size x data-parallel size" not in opd  # pre-training's default, not OPD's
    assert "--lr LR peak learning rate (default: 1e-06)" in opd
    assert "--lr LR peak learning rate (default: 1e-05)" in sft
    assert "(default: cosine)" in sft


def _readme_rows(title: str) -> dict[str, list[str]]:
    """The rows of the README table under `title`: first cell -> cells."""
    from conftest import REPO

    text = (REPO / "README.md").read_text().split(title, 1)[1]
    rows = {}
    for line in text.splitlines()[1:]:
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
        elif rows and not line.startswith("|"):
            break
    return rows


def test_readme_hardware_table_is_the_estimators(megatron_single_rank):
    """GiB per GPU from slurm/memory_estimate.py at the recipes' layouts, checkpoint bytes and
    GPU-days at 30% MFU from --describe's FLOPs: the README's figures, recomputed."""
    import sys

    import torch
    from conftest import REPO

    sys.path.insert(0, str(REPO / "slurm"))
    import memory_estimate

    from megatron_ext.flops import analytic_model_size, checkpoint_bytes, training_flops_per_token
    from megatron_ext.presets import get_preset
    from megatron_ext.recipes import load_recipe

    rows = _readme_rows("### Hardware per job")
    stages = {"1": 2.4e12, "2": 1.7e12, "3": 0.5e12, "4": 0.5e12}
    for model in ("nano", "mini"):
        recipe, preset = load_recipe(model), get_preset(model)
        even, skewed = (memory_estimate.estimate(model, recipe["ep"], 64, recipe["micro_batch"],
                                                 recipe["seq_length"], imbalance)["total_gib"]
                        for imbalance in (1.0, 2.0))
        flops = training_flops_per_token(analytic_model_size(preset), preset, 4096)
        size = checkpoint_bytes(preset, torch.bfloat16)[0] / 1e9
        for stage, tokens in stages.items():
            row = rows[f"{model.capitalize()} stage {stage}"]
            assert row[3] == f"{even:.1f} / {skewed:.1f}", row
            assert row[4] == f"{size:.0f} GB", row
            days = tokens * flops / (989e12 * 0.30) / 86400
            assert row[6] == f"{days:,.0f} ({days / 64:.1f})", row
        opd = memory_estimate.shipped_opd(model)
        assert rows[f"{model.capitalize()} OPD"][3] == f"{opd['with_context_gib']:.1f}"


def test_readme_8_gpu_mini_example_fits_an_h100():
    import re
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "slurm"))
    import memory_estimate

    text = (REPO / "README.md").read_text()
    command = text.split("torchrun --nproc-per-node 8 pretrain_marco.py --preset mini", 1)[1]
    micro = int(re.search(r"--micro-batch-size (\d+)", command).group(1))
    skewed = memory_estimate.estimate("mini", 8, 8, micro, 4096, 2.0)["total_gib"]
    assert skewed < 77, skewed  # 79.6 GiB less ~2 GiB of CUDA context and NCCL buffers
    assert f"{skewed:.1f} at 2x expert imbalance" in text


def test_every_marco_variable_the_slurm_scripts_read_is_in_the_settings_table():
    import re

    from conftest import REPO

    read = set()
    for path in [*(REPO / "slurm").glob("*.sh"), *(REPO / "slurm").glob("*.sbatch"),
                 *(REPO / "configs" / "recipes").glob("*.yaml"),
                 *(REPO / "configs" / "posttrain").glob("*.yaml")]:
        read |= set(re.findall(r"\bMARCO_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    table = "\n".join(line for line in (REPO / "docs" / "cluster.md").read_text().splitlines()
                      if line.startswith("| `MARCO_"))
    documented = set(re.findall(r"`(MARCO_[A-Z0-9_]+)`", table))
    assert len(read) > 60
    assert not read - documented, sorted(read - documented)


def test_evaluate_and_generate_default_to_the_auto_expert_backend():
    from test_cli_help import script_parser

    for tool in ("tools/evaluate.py", "tools/generate.py"):
        action = script_parser(tool, [])._option_string_actions["--moe-expert-backend"]
        assert action.default == "auto", tool


def test_generate_takes_megatron_lm_names_and_expert_tp_defaults_to_tp(monkeypatch):
    from conftest import load_tool

    from megatron_ext.presets import get_preset

    tool = load_tool("generate")
    base = ["--load", "c", "--prompts", "p.jsonl", "--out", "o.jsonl"]
    ours = tool.build_parser().parse_args([*base, "--max-new-tokens", "7", "--top-k", "5",
                                           "--top-p", "0.9"])
    megatron = tool.build_parser().parse_args([*base, "--num-tokens-to-generate", "7",
                                               "--top_k", "5", "--top_p", "0.9"])
    assert vars(ours) == vars(megatron)
    assert (megatron.max_new_tokens, megatron.top_k, megatron.top_p) == (7, 5, 0.9)
    monkeypatch.setenv("WORLD_SIZE", "2")
    tp2 = tool.build_parser().parse_args([*base, "--tensor-model-parallel-size", "2"])
    assert tool.layout_from_args(tp2, get_preset("tiny")).expert_tensor == 2  # was 1
    etp1 = tool.build_parser().parse_args([*base, "--tensor-model-parallel-size", "2",
                                           "--expert-tensor-parallel-size", "1"])
    assert tool.layout_from_args(etp1, get_preset("tiny")).expert_tensor == 1
