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
