"""lm-eval task planning shared by tools/evaluate.py and tools/decontaminate.py.

`plan_tasks` turns --tasks/--suite/--include-path into task names, suite entries and the folders
lm-eval must index (the user's, the bundled tasks' cache when a bundled task is named, and
configs/eval/tasks); it checks our task YAMLs for the fields lm-eval needs and tells whether
every task is local (then the tools run offline). `task_manager` builds lm-eval's TaskManager
(without its ~15k built-in tasks when all tasks are local: seconds instead of a minute) and
names the first unknown task in one line. `load_examples` yields each task's evaluation
documents with the text a model sees plus its answer (for decontamination).
"""

from __future__ import annotations

import functools
import glob
import os
from dataclasses import dataclass, field

import yaml

from megatron_ext.errors import UsageError
from megatron_ext.evaluation import suites
from megatron_ext.evaluation import tasks as bundled

LOCAL_DATASETS = {"json", "csv", "parquet", "text", "arrow"}


@dataclass
class Plan:
    tasks: list[str]
    entries: dict = field(default_factory=dict)        # task -> SuiteTask
    include_paths: list[str] = field(default_factory=list)
    local: bool = False
    suite: str | None = None


class _Tolerant(yaml.SafeLoader):
    """Reads lm-eval YAMLs (which use !function tags) for their plain fields."""


_Tolerant.add_multi_constructor("!", lambda loader, suffix, node: None)


def scan_task_files(paths: list[str]) -> dict:
    """task name -> (file, merged config) for every task YAML under the include paths."""
    found = {}
    for root in paths:
        for dirpath, _, names in os.walk(root):
            for name in sorted(n for n in names if n.endswith((".yaml", ".yml"))):
                path = os.path.join(dirpath, name)
                try:
                    data = _load_with_includes(path, yaml)
                except (yaml.YAMLError, OSError) as e:
                    raise UsageError(f"--include-path {path}: not valid YAML "
                                     f"({str(e).splitlines()[0]})") from None
                if isinstance(data, dict) and isinstance(data.get("task"), str):
                    found[data["task"]] = (path, data)
                elif isinstance(data, dict) and isinstance(data.get("group"), str):
                    found[data["group"]] = (path, data)
    return found


def _load_with_includes(path: str, yaml, depth: int = 0) -> dict:
    with open(path, encoding="utf-8") as f:
        data = yaml.load(f, Loader=_Tolerant) or {}
    if isinstance(data, dict) and isinstance(data.get("include"), str) and depth < 4:
        base = os.path.join(os.path.dirname(path), data["include"])
        if os.path.isfile(base):
            data = {**_load_with_includes(base, yaml, depth + 1), **data}
    return data


def check_task_file(task: str, path: str, config: dict) -> None:
    """A task YAML must name its data, prompt and answer (one line naming the missing field)."""
    if "group" in config and not isinstance(config.get("task"), str):
        return  # a group file: its member tasks are checked by name
    kind = config.get("output_type", "generate_until")
    needed = ["doc_to_target"] + {"multiple_choice": ["doc_to_text", "doc_to_choice"],
                                  "loglikelihood": ["doc_to_text"], "generate_until": ["doc_to_text"],
                                  }.get(kind, [])
    if not (config.get("dataset_path") or config.get("custom_dataset")):
        needed.insert(0, "dataset_path")
    else:
        needed = [k for k in needed if k not in config]
    missing = [k for k in needed if k not in config]
    if missing:
        raise UsageError(f"--include-path {path}: task '{task}' has no '{missing[0]}' (a {kind} task "
                         f"needs dataset_path, {', '.join(n for n in needed if n != 'dataset_path')})")
    for data in _data_files(config):
        if not glob.has_magic(data) and not os.path.exists(data):
            raise UsageError(f"--include-path {path}: task '{task}' reads {data} "
                             "(dataset_kwargs.data_files), which does not exist")


def _data_files(config: dict) -> list[str]:
    """The local files a task's dataset_kwargs.data_files names (a path, a list or a split map)."""
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        files = list(files.values())
    out = []
    for f in files if isinstance(files, list) else [files]:
        out += [x for x in (f if isinstance(f, list) else [f]) if isinstance(x, str)
                and "://" not in x]
    return out


def _is_local(config: dict) -> bool:
    path = config.get("dataset_path")
    return path in LOCAL_DATASETS or (isinstance(path, str) and os.path.exists(path))


def plan_tasks(tasks: str = "", suite: str | None = None, include_paths=(), task_cache=None) -> Plan:
    """Task names (suite first, then --tasks), suite entries, folders to index, locality."""

    entries, names = {}, []
    if suite:
        suite_obj = suites.load_suite(suite)
        for entry in suite_obj.tasks:
            entries[entry.task] = entry
            names.append(entry.task)
    for name in (t.strip() for t in (tasks or "").split(",")):
        if name and name not in names:
            names.append(name)
    if not names:
        raise UsageError("no tasks: give --tasks T1,T2 and/or --suite NAME")
    include = []
    for path in include_paths:
        if not os.path.isdir(path):
            raise UsageError(f"--include-path {path}: no such directory")
        include.append(os.path.abspath(path))
    if any(bundled.is_bundled(n) for n in names):
        include.append(bundled.ensure_bundled_tasks(task_cache))
    if os.path.isdir(suites.TASK_DIR):
        include.append(suites.TASK_DIR)
    files = scan_task_files(include)
    for name in names:
        if name in files:
            check_task_file(name, *files[name])
    local = all(n in files and (_is_local(files[n][1]) or "group" in files[n][1]) for n in names)
    return Plan(tasks=names, entries=entries, include_paths=include, local=local,
                suite=os.path.abspath(suites.suite_path(suite)) if suite else None)


def task_manager(plan: Plan):
    """lm-eval's TaskManager; without its ~15k built-in tasks when every task is local (fast)."""
    tm = _task_manager(tuple(plan.include_paths), not plan.local)
    known = set(tm.all_tasks)
    unknown = [t for t in plan.tasks if t not in known]
    if unknown and plan.local:  # cannot happen (local tasks were found on disk), but be exact
        tm = _task_manager(tuple(plan.include_paths), True)
        known = set(tm.all_tasks)
        unknown = [t for t in plan.tasks if t not in known]
    if unknown:
        import lm_eval

        raise UsageError(f"unknown task '{unknown[0]}': not in lm-eval {lm_eval.__version__}'s registry "
                         "nor in an --include-path folder (list them with `lm-eval ls tasks`)")
    return tm


@functools.lru_cache(maxsize=4)
def _task_manager(include_paths: tuple, include_defaults: bool):
    """One TaskManager per set of folders per process (indexing lm-eval's tasks takes ~20 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=include_defaults)


def set_offline(plan: Plan) -> None:
    """Local tasks need no network: say so before `datasets` is imported (it reads these then)."""
    if plan.local:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"


def leaf_tasks(task_dict: dict) -> dict:
    """{name: Task} of lm-eval's (possibly nested, group-keyed) task dict."""
    out = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            out.update(leaf_tasks(value))
        else:
            out[getattr(key, "group_name", None) or getattr(value, "task_name", None) or str(key)] = value
    return out


def example_text(task, doc) -> str:
    """What a model reads and answers: doc_to_text + delimiter + the correct target."""
    text = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        if isinstance(target, int) and 0 <= target < len(choices):
            target = choices[target]
        elif isinstance(target, list):
            target = choices[target[0]] if target and isinstance(target[0], int) else target[0]
    elif isinstance(target, list):
        target = target[0] if target else ""
    if isinstance(text, int):  # doc_to_text as an index into choices (e.g. winogrande)
        text = task.doc_to_choice(doc)[text]
    delimiter = task.config.target_delimiter or ""
    return f"{text}{delimiter}{target}"


def load_examples(plan: Plan, tm, limit: int | None = None):
    """(task name, Task, [(index, doc, text)]) for each leaf task, its evaluation split."""
    from lm_eval.tasks import get_task_dict

    out = []
    for name, task in leaf_tasks(get_task_dict(plan.tasks, tm)).items():
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        if docs is None:
            raise UsageError(f"task '{name}' has neither a test nor a validation split")
        rows = []
        for i, doc in enumerate(docs):
            if limit is not None and i >= limit:
                break
            rows.append((i, doc, example_text(task, doc)))
        out.append((name, task, rows))
    return out
