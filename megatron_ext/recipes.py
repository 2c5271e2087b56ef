"""Marco's recipes, one YAML file per model: the single place a run's settings are written.

    configs/recipes/MODEL.yaml       a model's pre-training recipe (preset, curriculum and its
                                     stages, start checkpoint, parallel layout, batch, learning
                                     rate, intervals) and its post-training additions
    configs/posttrain/marco.yaml     Marco's SFT/OPD recipe, shared by the models, which name
                                     it under `posttrain:` (their own `sft:`/`opd:` keys win)

    python -m megatron_ext.recipes MODEL      the recipe as shell assignments (what
                                              slurm/launch.sh and slurm/posttrain.sh evaluate)

A recipe names its architecture (`preset`, megatron_ext/presets.py) and its data
(`curriculum`, configs/curriculum/); it holds every other number of a Slurm job, with the
comments that explain them. Readers:
  - the Slurm launchers, through `shell_assignments`: a top-level key `k` becomes the shell
    variable `K`, a key `k` of the `sft`/`opd` section `SFT_K`/`OPD_K`, each a default that
    the launcher's MARCO_* variable of the same name overrides (docs/cluster.md);
  - posttrain_marco.py, through `flag_defaults`: the learning-rate keys of the SFT/OPD recipe
    are its flags' defaults, so the command line and the Slurm jobs share one recipe;
  - slurm/memory_estimate.py, through `load_recipe`: the shipped OPD layouts.

The shell gets each scalar as written in the file (`lr: 1.5e-4` stays `1.5e-4`, not YAML's
float 0.00015), so a launcher's command shows the recipe's own text. Keys are checked: a key
that no reader knows (a typo) or a missing one is one line naming the file and the key.
"""

from __future__ import annotations

import os
import shlex
import sys

import yaml

from megatron_ext.cli import run_tool, tool_parser
from megatron_ext.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES_DIR = os.path.join(REPO, "configs", "recipes")
POSTTRAIN_RECIPE = os.path.join(REPO, "configs", "posttrain", "marco.yaml")

# A model recipe's keys: what slurm/launch.sh reads for a pre-training stage (all required) ...
PRETRAIN_KEYS = ("preset", "curriculum", "stages", "init_checkpoint", "init_weights_only",
                 "tp", "pp", "ep", "nodes", "gpus_per_node", "micro_batch", "global_batch",
                 "seq_length", "lr", "min_lr", "lr_decay_style", "warmup_iters", "lr_schedule",
                 "save_interval", "eval_interval", "log_interval")
# ... and the post-training sections slurm/posttrain.sh reads (`posttrain:` names the file
# they come from). Section keys are checked against these, not required.
SECTION_KEYS = {
    "sft": ("iters", "lr", "min_lr", "lr_decay_style", "global_batch", "micro_batch",
            "seq_length", "data", "valid_data", "save_interval", "eval_interval"),
    "opd": ("lr", "min_lr", "lr_decay_style", "warmup_iters", "global_batch", "micro_batch",
            "decode_batch", "prompts", "eval_prompts", "save_interval", "eval_interval",
            "cascade"),
}
# Section keys that are also posttrain_marco.py's flag defaults: key -> argparse dest.
FLAG_DEFAULTS = {"lr": "lr", "min_lr": "min_lr", "lr_decay_style": "lr_decay_style",
                 "warmup_iters": "lr_warmup_iters"}


class _TextLoader(yaml.SafeLoader):
    """Every plain scalar as the text written (no int/float/bool resolution): for the shell."""


_TextLoader.yaml_implicit_resolvers = {}


def recipe_path(model: str) -> str:
    """configs/recipes/MODEL.yaml; a name that is not there is one line listing the recipes."""
    path = os.path.join(RECIPES_DIR, f"{model}.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"no recipe {path} (recipes: {', '.join(available())})")
    return path


def available() -> list[str]:
    """The model recipes shipped under configs/recipes/."""
    return sorted(name[:-5] for name in os.listdir(RECIPES_DIR) if name.endswith(".yaml"))


def _read(path: str, text: bool) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_TextLoader if text else yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _check_sections(data: dict, path: str) -> None:
    for section, keys in SECTION_KEYS.items():
        values = data.get(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: '{section}' must be a mapping of settings")
        for key in values:
            if key not in keys:
                raise ConfigError(f"{path}: unknown key '{section}.{key}' (expected one of "
                                  f"{', '.join(keys)})")


def load_posttrain(path: str | None = None, *, text: bool = False) -> dict:
    """The SFT/OPD recipe file (default: Marco's): {'sft': {...}, 'opd': {...}}."""
    path = path or POSTTRAIN_RECIPE
    data = _read(path, text)
    unknown = sorted(set(data) - set(SECTION_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (expected sections "
                          f"{', '.join(SECTION_KEYS)})")
    _check_sections(data, path)
    return data


def load_recipe(model: str, *, text: bool = False) -> dict:
    """A model's recipe with its `posttrain:` file merged under its own sft/opd keys.
    text=True: scalars as written (strings), for the shell."""
    path = recipe_path(model)
    data = _read(path, text)
    known = (*PRETRAIN_KEYS, "posttrain", *SECTION_KEYS)
    for key in data:
        if key not in known:
            raise ConfigError(f"{path}: unknown key '{key}' (expected one of {', '.join(known)})")
    missing = [key for key in PRETRAIN_KEYS if key not in data]
    if missing:
        raise ConfigError(f"{path}: missing key '{missing[0]}'")
    _check_sections(data, path)
    if data.get("posttrain"):
        shared = os.path.join(REPO, data["posttrain"])
        if not os.path.isfile(shared):
            raise ConfigError(f"{path}: posttrain: no file {shared}")
        base = load_posttrain(shared, text=text)
        for section in SECTION_KEYS:
            if section in base or section in data:
                data[section] = {**base.get(section, {}), **data.get(section, {})}
    return data


def _number(value):
    """'1e-5' (YAML 1.1 reads a float without a dot as text) -> 1e-05; other text unchanged."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def flag_defaults(kind: str, path: str | None = None) -> dict:
    """posttrain_marco.py KIND's flag defaults from the SFT/OPD recipe (lr, min lr, decay
    style, warmup), by argparse dest."""
    section = load_posttrain(path).get(kind, {})
    return {dest: _number(section[key]) for key, dest in FLAG_DEFAULTS.items() if key in section}


def _shell_value(value) -> str:
    if isinstance(value, list):
        return "(" + " ".join(shlex.quote(str(v)) for v in value) + ")"
    if value in ("true", "false"):
        return "1" if value == "true" else "0"
    return shlex.quote("" if value is None else str(value))


def shell_assignments(model: str) -> list[str]:
    """NAME=value lines of a model's recipe for `eval` in bash: RUN (the model), the top-level
    keys upper-cased, the sft/opd keys as SFT_*/OPD_*; booleans as 1/0, lists as arrays."""
    data = load_recipe(model, text=True)
    lines = [f"RUN={shlex.quote(model)}"]
    for key, value in data.items():
        if key == "posttrain":
            continue
        if key in SECTION_KEYS:
            lines += [f"{key.upper()}_{k.upper()}={_shell_value(v)}" for k, v in value.items()]
        else:
            if isinstance(value, dict):
                raise ConfigError(f"{recipe_path(model)}: '{key}' must be a value, not a mapping")
            lines.append(f"{key.upper()}={_shell_value(value)}")
    return lines


def main(argv=None) -> int:
    p = tool_parser(__doc__)
    p.add_argument("model", help="a recipe configs/recipes/MODEL.yaml")
    return run_tool(lambda a: print("\n".join(shell_assignments(a.model))), p, argv)


if __name__ == "__main__":
    sys.exit(main())
