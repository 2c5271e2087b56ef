"""Recipes (megatron_ext/recipes.py): one YAML file per model under configs/recipes/ and Marco's
SFT/OPD recipe configs/posttrain/marco.yaml, read by the Slurm launchers (as shell assignments)
and by posttrain_marco.py (its flag defaults). The launchers' dry runs with the shipped recipes
are tested in tests/test_slurm.py."""

import importlib.util
import subprocess

import pytest
from conftest import REPO, subprocess_env

from megatron_ext import recipes
from megatron_ext.errors import ConfigError

MODEL = """\
preset: tiny
curriculum: configs/curriculum/tiny.yaml
stages: [1, 2]
init_checkpoint: none
init_weights_only: true
tp: 1
pp: 1
ep: 2
nodes: 1
gpus_per_node: 2
micro_batch: 2
global_batch: 8
seq_length: 256
lr: 1.5e-4
min_lr: 3e-5
lr_decay_style: WSD
warmup_iters: 2
lr_schedule: run
save_interval: 0
eval_interval: 0
log_interval: 1
"""
POSTTRAIN = """\
sft:
  iters: 12
  lr: 2e-5
  min_lr: 2e-6
  lr_decay_style: linear
  data: my sft/train
opd:
  lr: 4e-6
  warmup_iters: 3
  decode_batch: 16
  cascade: configs/posttrain/tiny_cascade.yaml
"""


def _posttrain_marco():
    spec = importlib.util.spec_from_file_location("posttrain_marco", REPO / "posttrain_marco.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def recipe_dir(tmp_path, monkeypatch):
    """A recipes directory with model 'toy' (MODEL + the posttrain file POSTTRAIN)."""
    (tmp_path / "posttrain.yaml").write_text(POSTTRAIN)
    (tmp_path / "toy.yaml").write_text(
        MODEL + f"posttrain: {tmp_path / 'posttrain.yaml'}\nopd:\n  decode_batch: 4\n")
    monkeypatch.setattr(recipes, "RECIPES_DIR", str(tmp_path))
    return tmp_path


def test_shell_assignments_keep_the_recipes_text_and_merge_the_posttrain_file(recipe_dir):
    lines = recipes.shell_assignments("toy")
    assert lines[0] == "RUN=toy"
    for line in ("PRESET=tiny", "STAGES=(1 2)", "INIT_WEIGHTS_ONLY=1", "LR=1.5e-4", "MIN_LR=3e-5",
                 "SAVE_INTERVAL=0", "SFT_ITERS=12", "SFT_LR=2e-5", "SFT_DATA='my sft/train'",
                 "OPD_LR=4e-6", "OPD_DECODE_BATCH=4",  # the model's own opd key wins
                 "OPD_CASCADE=configs/posttrain/tiny_cascade.yaml"):
        assert line in lines, line
    assert "OPD_DECODE_BATCH=16" not in lines
    # What bash makes of them (slurm/common.sh's load_recipe evaluates the same lines).
    script = "\n".join(lines) + '\necho "${STAGES[1]}|$LR|$SFT_DATA|$INIT_WEIGHTS_ONLY"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout == "2|1.5e-4|my sft/train|1\n"


def test_shipped_recipes_hold_the_slurm_settings():
    nano, mini, glob = (recipes.load_recipe(m) for m in ("nano", "mini", "mini_global"))
    assert recipes.available() == ["mini", "mini_global", "nano"]
    assert (nano["preset"], nano["micro_batch"], nano["stages"]) == ("nano", 2, [1, 2, 3, 4])
    assert (glob["preset"], glob["stages"], glob["init_weights_only"]) == ("mini-global", [5], True)
    assert nano["sft"] == mini["sft"] and "sft" not in glob  # Marco's SFT recipe, shared
    assert nano["opd"]["cascade"] == "configs/posttrain/marco_nano_cascade.yaml"
    assert mini["opd"]["cascade"] == "configs/posttrain/marco_mini_cascade.yaml"
    assert "LR=1.5e-4" in recipes.shell_assignments("mini_global")  # as written, not 0.00015


def test_posttrain_marco_defaults_are_the_posttrain_recipe(tmp_path, monkeypatch):
    entry = _posttrain_marco()
    sft = entry.build_parser().parse_args(["sft"])
    opd = entry.build_parser().parse_args(["opd"])
    assert (sft.lr, sft.min_lr, sft.lr_decay_style) == (1e-5, 1e-6, "cosine")
    assert (opd.lr, opd.min_lr, opd.lr_decay_style, opd.lr_warmup_iters) == (1e-6, 1e-6, "constant", 0)
    shipped = recipes.load_posttrain()
    assert (float(shipped["sft"]["lr"]), shipped["opd"]["lr_decay_style"]) == (sft.lr, opd.lr_decay_style)

    (tmp_path / "posttrain.yaml").write_text(POSTTRAIN)
    monkeypatch.setattr(recipes, "POSTTRAIN_RECIPE", str(tmp_path / "posttrain.yaml"))
    sft = entry.build_parser().parse_args(["sft"])
    opd = entry.build_parser().parse_args(["opd"])
    assert (sft.lr, sft.min_lr, sft.lr_decay_style) == (2e-5, 2e-6, "linear")
    assert (opd.lr, opd.lr_warmup_iters) == (4e-6, 3)
    assert entry.build_parser().parse_args(["sft", "--lr", "3e-5"]).lr == 3e-5


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("micro_batch:", "micro_bach:"),
     "toy.yaml: unknown key 'micro_bach' (expected one of preset,"),
    (lambda t: t.replace("lr_schedule: run\n", ""), "toy.yaml: missing key 'lr_schedule'"),
    (lambda t: t + "opd:\n  decode_bach: 4\n", "toy.yaml: unknown key 'opd.decode_bach'"),
    (lambda t: t + "sft: 3\n", "toy.yaml: 'sft' must be a mapping of settings"),
    (lambda t: t + "posttrain: configs/posttrain/absent.yaml\n", "toy.yaml: posttrain: no file"),
    (lambda t: t.replace("tp: 1", "tp: {a: 1}"), "toy.yaml: 'tp' must be a value, not a mapping"),
    (lambda t: t + "lr: [\n", "toy.yaml: not valid YAML"),
    (lambda t: "- preset\n", "toy.yaml: expected a mapping of settings, got list"),
])
def test_a_bad_recipe_is_one_line_naming_the_file_and_key(tmp_path, monkeypatch, edit, message):
    (tmp_path / "toy.yaml").write_text(edit(MODEL))
    monkeypatch.setattr(recipes, "RECIPES_DIR", str(tmp_path))
    with pytest.raises(ConfigError) as e:
        recipes.shell_assignments("toy")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_launchers_name_a_missing_recipe_in_one_line():
    for script, args in (("launch.sh", ["nanoo", "1"]), ("posttrain.sh", ["nanoo", "sft"])):
        out = subprocess.run(["bash", str(REPO / "slurm" / script), *args], cwd=REPO,
                             env={**subprocess_env(), "MARCO_DRY_RUN": "1"}, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and out.stdout == "", out
        assert out.stderr == (f"{script}: error: no recipe {REPO}/configs/recipes/nanoo.yaml "
                              "(recipes: mini, mini_global, nano)\n")
