"""The documentation stays true to the code: every fenced shell command in README.md and
docs/*.md that runs one of the repository's scripts uses only flags that script's parser has
(parsers taken in-process, as tests/test_cli_help.py does), every repository path a command
or a link names exists, and no link leaves the repository. A doc that drifts from the code
fails here."""

from __future__ import annotations

import functools
import glob
import re
import shlex
from pathlib import Path

import pytest
from test_cli_help import script_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = ("bash", "sh", "shell", "console")
# Top-level folders whose paths a command may name (anything else is the user's: /data, runs/).
REPO_DIRS = ("configs/", "slurm/", "tools/", "docs/", "examples/", "bench/", "megatron_ext/",
             "tests/", "requirements/", "data/corpus", "data/sft", "data/tokenizer")
SHELL_WORDS = {"export", "cd", "for", "do", "done", "if", "then", "fi", "echo", "ls", "cat",
               "mkdir", "tensorboard", "huggingface-cli", "hf", "pip", "git", "sbatch", "squeue",
               "scontrol", "srun", "tail", "watch", "wandb", "du", "find", "head", "sacct"}


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a fenced shell block: continuation lines joined, comments and
    prompts dropped, split at ; && || |, each as shlex words."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        current: list[str] = []
        for word in words:
            if word in (";", "&&", "||", "|", "&"):
                commands.append(current)
                current = []
            elif word.endswith(";") and len(word) > 1:
                current.append(word[:-1])
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
    return [c for c in commands if c]


def fenced_blocks(text: str):
    """(first line number, language, body) of each fenced block, fences paired in order."""
    lines, block = text.splitlines(), None
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            if block is None:
                block = (number + 1, line.strip()[3:].strip(), [])
            else:
                yield block[0], block[1], "\n".join(block[2]) + "\n"
                block = None
        elif block is not None:
            block[2].append(line)


def doc_commands():
    for doc in DOCS:
        for line, lang, body in fenced_blocks(doc.read_text()):
            if lang in SHELL_FENCES:
                for command in shell_commands(body):
                    yield f"{doc.relative_to(REPO)}:{line}", command


def script_and_args(command: list[str]):
    """(script path relative to the repo, its arguments) when the command runs a repository
    script (python X.py, torchrun ... X.py, bash X.sh/.sbatch); else None."""
    words = list(command)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value prefix
        words.pop(0)
    if not words:
        return None
    program, rest = words[0], words[1:]
    if program in ("python", "python3") or program.endswith("/python"):
        if not rest or rest[0] in ("-m", "-c", "-"):
            return None
        return rest[0], rest[1:]
    if program in ("torchrun", "bash", "sbatch", "srun"):
        for i, word in enumerate(rest):
            if word.endswith((".py", ".sh", ".sbatch")):
                return word, rest[i + 1:]
        return None
    if program.endswith((".py", ".sh", ".sbatch")):
        return program, rest
    return None


@functools.lru_cache(maxsize=None)
def _parser(script: str, key: tuple):
    return script_parser(script, list(key))


def parser_for(script: str, args: list[str]):
    """The parser that reads `args` of `script`, and the arguments it reads."""
    if script == "posttrain_marco.py":
        sub = next((a for a in args if a in ("sft", "opd")), None)
        if sub is None:
            return None, []
        top = _parser(script, ("sft",))
        import argparse

        subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
        return subs[sub], args[args.index(sub) + 1:]
    if script == "slurm/memory_estimate.py":
        if args[:1] == ["opd"]:
            return _parser(script, ("opd",)), args[1:]
        return (_parser(script, ("--preset", "nano")), args) if args else (None, [])
    if script == "slurm/pretrain_stage.py":
        return _parser(script, ("--",)), args[:args.index("--")] if "--" in args else args
    return _parser(script, ()), args


SCRIPTS = ("pretrain_marco.py", "posttrain_marco.py", "tools/", "slurm/", "examples/")


def braces(word: str) -> list[str]:
    """Shell brace expansion of one {a,b} group (enough for the docs)."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", word)
    if not match:
        return [word]
    return [w for part in match.group(1).split(",")
            for w in braces(word[:match.start()] + part + word[match.end():])]


def missing_paths(where: str, words: list[str]) -> list[str]:
    return [f"{where}: {path} does not exist" for word in words
            if word.startswith(REPO_DIRS) and "$" not in word and "<" not in word
            for path in braces(word.split("=", 1)[-1]) if not glob.glob(str(REPO / path))]


def check_command(where: str, command: list[str]) -> list[str]:
    found = script_and_args(command)
    problems = missing_paths(where, command)
    if found is None:
        return problems
    script, args = found
    if not (REPO / script).exists():
        return problems + [f"{where}: {script} does not exist"]
    if not script.endswith(".py") or not script.startswith(SCRIPTS):
        return problems
    parser, own = parser_for(script, args)
    if parser is None:
        return problems
    known = parser._option_string_actions
    for word in own:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and flag != "--" and flag not in known:
            problems.append(f"{where}: {script} has no option {flag}")
    if script == "slurm/pretrain_stage.py" and "--" in args:
        trainer = _parser("pretrain_marco.py", ())._option_string_actions
        problems += [f"{where}: pretrain_marco.py has no option {w.split('=')[0]}"
                     for w in args[args.index("--") + 1:]
                     if w.startswith("--") and w.split("=")[0] not in trainer]
    return problems


def test_the_docs_have_commands_to_check():
    commands = list(doc_commands())
    assert len(commands) > 40
    assert sum(script_and_args(c) is not None for _, c in commands) > 30


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_documented_command_uses_real_scripts_flags_and_paths(doc):
    problems = [p for where, command in doc_commands() if where.startswith(str(doc.relative_to(REPO)))
                for p in check_command(where, command)]
    assert not problems, "\n".join(problems)


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_link_is_in_the_repository_and_exists(doc):
    text = doc.read_text()
    problems = [f"{doc.name}: {path} is not a file of the repository"
                for path in re.findall(r"`(\.\./[^`\s]+)`", text)
                if not ((doc.parent / path).resolve().is_relative_to(REPO)
                        and (doc.parent / path).exists())]
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:|#", target):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.is_relative_to(REPO):
            problems.append(f"{doc.name}: link {target} leaves the repository")
        elif not path.exists():
            problems.append(f"{doc.name}: link {target} does not exist")
    assert not problems, "\n".join(problems)
