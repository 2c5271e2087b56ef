"""Presets and --describe: parameter counts from the real Megatron model on the meta device."""

import json

import pytest
from conftest import run_pretrain

from megatron_ext.flops import analytic_model_size, count_parameters
from megatron_ext.model import build_meta_model
from megatron_ext.presets import PRESETS, get_preset


@pytest.mark.parametrize(
    "preset, total_b, active_b",
    [("nano", 8.0, 0.60), ("mini", 17.3, 0.86)],
)
def test_describe_matches_paper(preset, total_b, active_b):
    result = run_pretrain("--preset", preset, "--describe", timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1, result.stdout
    info = json.loads(lines[0])
    assert info["total_params"] == pytest.approx(total_b * 1e9, rel=0.01)
    assert info["active_params"] == pytest.approx(active_b * 1e9, rel=0.01)
    # 6 x active matmul params + causal attention; the attention share at 4096 tokens is real.
    assert info["train_flops_per_token"] > 6 * 0.95 * info["active_params"]
    assert info["train_flops_per_token"] == pytest.approx(
        info["train_flops_per_token_no_attention"]
        + 6 * 28 * 4096 * 16 * 128
    )


@pytest.mark.parametrize("name", list(PRESETS))
def test_formula_counts_equal_meta_model_counts(megatron_single_rank, name):
    preset = get_preset(name)
    assert analytic_model_size(preset) == count_parameters(build_meta_model(preset), preset)


def test_tiny_dense_is_the_parent_of_tiny():
    tiny, dense = get_preset("tiny"), get_preset("tiny-dense")
    assert dense.ffn_hidden_size == tiny.slices_per_dense_ffn * tiny.moe_ffn_hidden_size
    for field in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                  "kv_channels", "vocab_size"):
        assert getattr(dense, field) == getattr(tiny, field)


def test_presets_follow_the_paper():
    nano, mini, parent = get_preset("nano"), get_preset("mini"), get_preset("qwen3-0.6b")
    assert (nano.num_experts, nano.moe_ffn_hidden_size, nano.moe_router_topk) == (232, 384, 8)
    assert (mini.num_experts, mini.moe_ffn_hidden_size, mini.moe_router_topk) == (256, 768, 8)
    assert nano.slices_per_dense_ffn == 8 and nano.num_experts // 8 == 29
    assert mini.slices_per_dense_ffn == 4 and mini.num_experts // 4 == 64
    for p in (nano, mini, parent):
        assert (p.num_layers, p.hidden_size, p.num_attention_heads, p.num_query_groups) == (28, 1024, 16, 8)
        assert (p.kv_channels, p.vocab_size, p.rotary_base, p.norm_epsilon) == (128, 151936, 1e6, 1e-6)
        assert p.tie_embeddings
