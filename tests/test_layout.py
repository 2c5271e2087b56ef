"""The 4D layout is validated before any process group or model exists; each rule is named."""

import pytest
from conftest import run_pretrain, subprocess_env

from megatron_ext.parallel import LayoutError, ParallelLayout, validate_layout
from megatron_ext.presets import get_preset, override

TINY = get_preset("tiny")


def test_valid_layouts_give_data_parallel_size():
    assert validate_layout(ParallelLayout(), TINY, 1) == 1
    assert validate_layout(ParallelLayout(expert=2), TINY, 2) == 2
    assert validate_layout(ParallelLayout(tensor=2, sequence_parallel=True, expert=2), TINY, 4) == 2
    assert validate_layout(ParallelLayout(pipeline=2, expert=2), TINY, 4) == 2


@pytest.mark.parametrize(
    "layout, preset, world, message",
    [
        (ParallelLayout(tensor=2, sequence_parallel=True), TINY, 3, "world size 3 is not divisible"),
        (ParallelLayout(expert=3), TINY, 3, "16 experts are not divisible by --expert-model-parallel-size 3"),
        (ParallelLayout(pipeline=3), TINY, 3,
         "4 layers of preset 'tiny' are not divisible by --pipeline-model-parallel-size 3"),
        (ParallelLayout(tensor=8, sequence_parallel=True), override(TINY, num_attention_heads=12), 8,
         "attention heads"),
        (ParallelLayout(tensor=2), TINY, 2, "needs --sequence-parallel"),
        (ParallelLayout(expert=4), TINY, 2,
         "--expert-model-parallel-size 4 x --expert-tensor-parallel-size 1 must divide"),
        (ParallelLayout(expert=2), get_preset("tiny-dense"), 2, "dense preset"),
    ],
)
def test_each_violation_is_named(layout, preset, world, message):
    with pytest.raises(LayoutError, match=message):
        validate_layout(layout, preset, world)


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--preset", "giant"], {}, "--preset: unknown preset 'giant'"),
        (["--tensor-model-parallel-size", "3"], {"WORLD_SIZE": "4"}, "world size 4 is not divisible"),
        (["--expert-model-parallel-size", "3"], {"WORLD_SIZE": "3"},
         "not divisible by --expert-model-parallel-size 3"),
        (["--fp8-format", "hybrid"], {}, "FP8 needs TransformerEngine"),
        (["--load", "/nonexistent/ckpt", "--mock-data"], {},
         "--load /nonexistent/ckpt: no such checkpoint directory"),
    ],
)
def test_bad_input_exits_with_one_line(argv, env, message):
    result = run_pretrain(*argv, env=subprocess_env(**env), timeout=120)
    assert result.returncode == 2
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "step" not in result.stdout  # nothing trained
