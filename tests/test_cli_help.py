"""Every option of every entry point's and tool's parser has a help text that shows its
default once, and every subcommand has a description (issue: the cluster user's path).

Each script's parser is taken in-process: the script runs as __main__ with a parse call that
hands back the parser instead of parsing (no model, no data, no subprocess)."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# (script, argv that reaches its parser); scripts with several parsers appear once per parser.
SCRIPTS = [
    ("pretrain_marco.py", []),
    ("posttrain_marco.py", ["sft"]),
    ("slurm/pretrain_stage.py", ["--"]),
    ("slurm/memory_estimate.py", ["--preset", "nano"]),
    ("slurm/memory_estimate.py", ["opd"]),
    ("examples/launch_nemo_run.py", []),
    ("examples/generate.py", []),
    ("examples/eval_loss.py", []),
    ("examples/opd_demo.py", []),
    *[(f"tools/{p.name}", []) for p in sorted((REPO / "tools").glob("*.py"))],
]


class _Captured(BaseException):
    def __init__(self, parser):
        self.parser = parser


def script_parser(script: str, argv: list[str]) -> argparse.ArgumentParser:
    """The parser `script` builds when run as `python script argv...`."""
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    saved_argv, saved_path = sys.argv, list(sys.path)
    argparse.ArgumentParser.parse_known_args = capture
    sys.argv = [str(REPO / script), *argv]
    sys.path.insert(0, str((REPO / script).parent))
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
        sys.argv, sys.path[:] = saved_argv, saved_path
    raise AssertionError(f"{script} {argv}: no parser was used")


def all_parsers(parser: argparse.ArgumentParser, name: str):
    """(name, parser) of `parser` and its subcommands, recursively."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from all_parsers(sub, f"{name} {sub_name}")


def help_problems(parser: argparse.ArgumentParser, name: str) -> list[str]:
    problems = []
    if " " in name and not parser.description:
        problems.append(f"{name}: subcommand without a description")
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                               argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        flag = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            problems.append(f"{name} {flag}: no help text")
            continue
        shown = formatter._expand_help(action)
        if "(default: None)" in shown or "(default: False)" in shown:
            problems.append(f"{name} {flag}: help shows a meaningless default: {shown!r}")
        if shown.lower().count("default:") > 1:
            problems.append(f"{name} {flag}: default stated twice: {shown!r}")
        default = action.default
        if (action.option_strings and default not in (None, False, argparse.SUPPRESS, [])
                and "default" not in shown.lower() and str(default) not in shown):
            problems.append(f"{name} {flag}: help does not show the default {default!r}")
    return problems


@pytest.mark.parametrize("script, argv", SCRIPTS, ids=[f"{s} {' '.join(a)}".strip() for s, a in SCRIPTS])
def test_every_option_has_help_showing_its_default_once(script, argv):
    problems = [p for name, parser in all_parsers(script_parser(script, argv), script)
                for p in help_problems(parser, name)]
    assert not problems, "\n".join(problems)
