"""Suites: named lists of real lm-eval tasks with their few-shot counts, groups and languages.

A suite is a YAML file (configs/eval/<name>.yaml, or any path):

    name: multilingual
    group: multilingual          # the summary's table / bar chart this suite's tasks go to
    description: ...
    include: [other_suite]       # optional: other suites (by name or path), merged first
    tasks:
      - {task: xnli_de, num_fewshot: 0, language: de, benchmark: XNLI, metric: acc}
      - ...

`task` must be a task or group that lm-eval's TaskManager knows (its registry, the bundled
tasks, or an --include-path folder; tests/test_evaluate.py checks every suite against the
installed lm-eval). `num_fewshot` defaults to the task's own; `metric` (the number the tables
and charts show) to the first of acc, exact_match, chrf, ... that lm-eval reports; `group`
(per task) overrides the suite's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import yaml

from megatron_ext.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE_DIR = os.path.join(REPO, "configs", "eval")
TASK_DIR = os.path.join(SUITE_DIR, "tasks")  # our custom lm-eval task YAMLs (FLORES-200 En-Xx)
ENTRY_KEYS = {"task", "num_fewshot", "language", "benchmark", "metric", "group"}


@dataclass(frozen=True)
class SuiteTask:
    task: str
    num_fewshot: Optional[int] = None
    group: str = "tasks"
    language: Optional[str] = None
    benchmark: Optional[str] = None
    metric: Optional[str] = None


@dataclass
class Suite:
    name: str
    path: str
    tasks: list[SuiteTask] = field(default_factory=list)

    def task_names(self) -> list[str]:
        return [t.task for t in self.tasks]


def suite_path(name_or_path: str) -> str:
    if os.path.isfile(name_or_path):
        return name_or_path
    path = os.path.join(SUITE_DIR, f"{name_or_path}.yaml")
    if not os.path.isfile(path):
        known = ", ".join(available_suites())
        raise UsageError(f"--suite {name_or_path}: no such suite file nor a suite in configs/eval "
                         f"(known: {known})")
    return path


def available_suites() -> list[str]:
    return sorted(n[:-5] for n in os.listdir(SUITE_DIR) if n.endswith(".yaml"))


def load_suite(name_or_path: str, _seen: Optional[set] = None) -> Suite:
    path = os.path.abspath(suite_path(name_or_path))
    seen = set() if _seen is None else _seen
    if path in seen:
        raise UsageError(f"--suite {path}: includes itself")
    seen.add(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UsageError(f"--suite {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks", []), list):
        raise UsageError(f"--suite {path}: expected a mapping with a 'tasks' list")
    suite = Suite(name=str(data.get("name") or os.path.basename(path)[:-5]), path=path)
    for other in data.get("include") or []:
        suite.tasks += load_suite(other, seen).tasks
    group = str(data.get("group") or suite.name)
    for i, entry in enumerate(data.get("tasks") or []):
        suite.tasks.append(_entry(entry, group, f"--suite {path}: tasks[{i}]"))
    return suite


def _entry(entry, group: str, where: str) -> SuiteTask:
    if isinstance(entry, str):
        entry = {"task": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("task"), str):
        raise UsageError(f"{where}: expected a task name or a mapping with 'task'")
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected "
                         f"{', '.join(sorted(ENTRY_KEYS))}")
    shots = entry.get("num_fewshot")
    if shots is not None and (not isinstance(shots, int) or shots < 0):
        raise UsageError(f"{where}: num_fewshot {shots!r} is not a count")
    return SuiteTask(task=entry["task"], num_fewshot=shots, group=str(entry.get("group") or group),
                     language=entry.get("language"), benchmark=entry.get("benchmark"),
                     metric=entry.get("metric"))
