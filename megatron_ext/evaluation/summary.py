"""The summary of an lm-eval run: rows, markdown tables per group and per language, bar charts,
and the record of every setting a score depends on.

A row is one task's headline number: the suite's `metric` for it, else the first of
`HEADLINE_METRICS` that lm-eval reports (with its standard error). Its group and language come
from the suite entry, else from the task's YAML metadata (`group`, `language`: the bundled
tasks have both), else "tasks" and the task name's language suffix (xnli_de -> de,
belebele_deu_Latn -> deu_Latn).

The settings record holds, per task: lm-eval's task version, the few-shot count, the prompt
template (doc_to_text / doc_to_target / doc_to_choice, delimiters, description), the metrics
with their options (acc vs acc_norm is the length normalisation), filters and generation
arguments; and per run: model kind, checkpoint path and step (or HF directory), dtype, batch
size, chat template (the template text itself when applied), system instruction, limit, seeds
and the lm-eval version. The published-settings complaint about the paper is answered by this
record, which sits beside the scores in results.json.
"""

from __future__ import annotations

import os
import re
from typing import Optional

HEADLINE_METRICS = ("acc", "exact_match", "chrf", "acc_norm", "f1", "bleu", "mcc", "word_perplexity")
TEMPLATE_KEYS = ("description", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter",
                 "fewshot_delimiter", "fewshot_split", "output_type", "generation_kwargs",
                 "filter_list", "metric_list", "dataset_path", "dataset_name", "test_split")
LANG_SUFFIX = re.compile(r"_([a-z]{2,3}(?:_[A-Z][a-z]{3})?)$")


def _metric_value(task_results: dict, metric: str) -> tuple[Optional[float], Optional[float]]:
    for key, value in task_results.items():
        if key.split(",")[0] == metric and isinstance(value, (int, float)):
            stderr = task_results.get(key.replace(metric + ",", metric + "_stderr,", 1))
            return float(value), (float(stderr) if isinstance(stderr, (int, float)) else None)
    return None, None


def headline(task_results: dict, preferred: Optional[str] = None) -> tuple:
    """(metric, value, stderr) of a task's headline number, or Nones."""
    for metric in ((preferred,) if preferred else ()) + HEADLINE_METRICS:
        value, stderr = _metric_value(task_results, metric)
        if value is not None:
            return metric, value, stderr
    return None, None, None


def language_of(task: str, config: dict) -> Optional[str]:
    meta = (config or {}).get("metadata") or {}
    if meta.get("language"):
        return str(meta["language"])
    m = LANG_SUFFIX.search(task)
    return m.group(1) if m else None


def rows(results: dict, entries: dict) -> list[dict]:
    """One row per evaluated task (leaf tasks and groups lm-eval reports)."""
    out = []
    configs = results.get("configs", {})
    for task, task_results in results.get("results", {}).items():
        entry = entries.get(task)
        config = configs.get(task, {})
        meta = config.get("metadata") or {}
        preferred = (entry.metric if entry else None) or meta.get("metric")
        metric, value, stderr = headline(task_results, preferred)
        if metric is None:
            continue
        out.append({
            "task": task,
            "group": (entry.group if entry else None) or meta.get("group") or "tasks",
            "language": (entry.language if entry and entry.language else None) or language_of(task, config),
            "benchmark": (entry.benchmark if entry else None) or task,
            "metric": metric, "value": value, "stderr": stderr,
            "num_fewshot": results.get("n-shot", {}).get(task),
            "samples": (results.get("n-samples", {}).get(task) or {}).get("effective"),
            "chance": meta.get("chance"),
        })
    return out


def _fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4f}"


def markdown(table_rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| task | language | metric | value | ± stderr | n-shot | samples |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in table_rows:
        lines.append(f"| {r['task']} | {r['language'] or ''} | {r['metric']} | {_fmt(r['value'])} | "
                     f"{_fmt(r['stderr'])} | {'' if r['num_fewshot'] is None else r['num_fewshot']} | "
                     f"{r['samples'] if r['samples'] is not None else ''} |")
    return "\n".join(lines) + "\n"


def markdown_report(all_rows: list[dict], settings: dict) -> str:
    parts = ["# Evaluation summary", "",
             f"Model: {settings.get('model')} `{settings.get('checkpoint') or settings.get('hf_dir')}`"
             + (f" (step {settings['step']})" if settings.get("step") is not None else "")
             + f"; dtype {settings.get('dtype')}; batch size {settings.get('batch_size')}; chat template "
             + ("applied" if settings.get("apply_chat_template") else "not applied")
             + f"; lm-eval {settings.get('lm_eval_version')}. All settings: results.json `marco`.", "",
             "## By group", ""]
    for group in sorted({r["group"] for r in all_rows}):
        parts.append(markdown([r for r in all_rows if r["group"] == group], group))
    parts += ["## By language", ""]
    for lang in sorted({r["language"] for r in all_rows if r["language"]}):
        parts.append(markdown([r for r in all_rows if r["language"] == lang], lang))
    return "\n".join(parts)


def bar_chart(group_rows: list[dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["task"] for r in group_rows]
    values = [r["value"] for r in group_rows]
    errors = [r["stderr"] or 0.0 for r in group_rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(labels) + 1.5), 4.0))
    ax.bar(range(len(labels)), values, yerr=errors, color="#4c72b0", capsize=2)
    for i, r in enumerate(group_rows):
        if r.get("chance") is not None:
            ax.hlines(r["chance"], i - 0.4, i + 0.4, colors="#c44e52", linestyles="dashed")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
    metrics = sorted({r["metric"] for r in group_rows})
    ax.set_ylabel(", ".join(metrics))
    ax.set_title(title + ("  (dashed: chance)" if any(r.get("chance") for r in group_rows) else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def task_settings(results: dict) -> dict:
    out = {}
    for task, config in results.get("configs", {}).items():
        out[task] = {
            "version": results.get("versions", {}).get(task),
            "num_fewshot": results.get("n-shot", {}).get(task),
            "higher_is_better": results.get("higher_is_better", {}).get(task),
            **{k: config.get(k) for k in TEMPLATE_KEYS if k in config},
            "normalisation": sorted({m.get("metric") for m in config.get("metric_list", [])
                                     if isinstance(m, dict) and str(m.get("metric", "")).startswith("acc")}),
        }
    return out


def write_summary(out_dir: str, results: dict, entries: dict, settings: dict) -> list[dict]:
    """summary.md, summary.json rows and one <group>.png per group into `out_dir`."""
    import json

    all_rows = rows(results, entries)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(markdown_report(all_rows, settings))
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"rows": all_rows, "settings": settings}, f, indent=2, ensure_ascii=False, default=str)
    for group in sorted({r["group"] for r in all_rows}):
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", group)
        bar_chart([r for r in all_rows if r["group"] == group], group, os.path.join(out_dir, f"{safe}.png"))
    return all_rows
