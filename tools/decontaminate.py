#!/usr/bin/env python3
"""Find evaluation examples whose text occurs in the training data: n-gram overlap on token ids.

    python tools/decontaminate.py --curriculum configs/curriculum/tiny.yaml --suite bundled --out runs/decon
    python tools/decontaminate.py --data-path /data/en_text_document /data/de_text_document \\
        --tasks xnli_de,belebele_deu_Latn --ngram 13 --out decon/xnli
    python tools/decontaminate.py --data-path 0.7 /data/a 0.3 /data/b --eval-jsonl my_test.jsonl \\
        --text-key question,answer --out decon/mine
    # Slurm array: one shard per task, then merge
    python tools/decontaminate.py ... --num-shards 16 --shard-index $SLURM_ARRAY_TASK_ID --out decon/shard$I
    python tools/decontaminate.py --merge decon/shard* --out decon/all

Training data: Megatron indexed datasets (--data-path, Megatron-LM's blend syntax; weights are
ignored) or every source of a curriculum (--curriculum; "@sample" = the bundled corpus,
tokenized into the data cache). Evaluation sets: lm-eval tasks (--tasks/--suite/--include-path,
the bundled marco_* tasks included) or JSON-lines files (--eval-jsonl with --text-key). The
evaluation text is tokenized with the tokenizer that made the training data (--tokenizer-*;
default: the bundled one). --out gets report.json (per example: index, checked, contaminated,
coverage, longest_match; per task: totals, with `unchecked`: examples shorter than --ngram
tokens, which n-grams cannot judge) and clean/: the checked, uncontaminated examples as JSON
lines (never an unchecked one), and
for lm-eval tasks as tasks `<task>_clean` to evaluate with tools/evaluate.py --include-path
OUT/clean. With --num-shards, --out gets shard.json (the n-grams found) for --merge.
See megatron_ext/evaluation/decontam.py and docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_ext.cli import (  # noqa: E402
    RawDescriptionHelpFormatter,
    UsageError,
    atomic_directory,
    fail,
    quiet_imports,
)
from megatron_ext.errors import MarcoError  # noqa: E402

SHARD_FILE, REPORT_FILE = "shard.json", "report.json"
EVAL_KEYS = ("tasks", "suite", "include_path", "eval_jsonl", "text_key", "limit", "ngram",
             "tokenizer_type", "tokenizer_model", "task_cache")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=RawDescriptionHelpFormatter)
    train = p.add_mutually_exclusive_group()
    train.add_argument("--data-path", nargs="+", help="indexed dataset prefixes (optionally weighted)")
    train.add_argument("--curriculum", help="curriculum YAML: every source of every stage")
    train.add_argument("--merge", nargs="+", metavar="SHARD_DIR", help="merge sharded runs' outputs")
    p.add_argument("--tasks", default="", help="lm-eval task/group names, comma-separated")
    p.add_argument("--suite", help="a suite in configs/eval (by name) or a suite file")
    p.add_argument("--include-path", action="append", default=[], help="folder of lm-eval task YAMLs "
                   "(runs the Python its YAMLs name with !function: trusted folders only)")
    p.add_argument("--eval-jsonl", nargs="+", help="evaluation sets as JSON lines")
    p.add_argument("--text-key", help="with --eval-jsonl: field(s) holding the text, comma-separated")
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    p.add_argument("--ngram", type=int, default=13, help="n-gram length in tokens")
    p.add_argument("--num-shards", type=int, default=1, help="split the training data into K shards")
    p.add_argument("--shard-index", type=int, default=0, help="this shard (0..K-1)")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                   choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"],
                   help="kind of --tokenizer-model")
    p.add_argument("--tokenizer-model", help="the tokenizer the training data was made with "
                   "(default: the bundled data/tokenizer/marco_tiny_spm.model)")
    p.add_argument("--task-cache", help="where the bundled tasks are generated")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


# ------------------------------------------------------------------------------ inputs
def check_args(args) -> None:
    if not (args.data_path or args.curriculum or args.merge):
        raise UsageError("give the training data: --data-path PREFIX [PREFIX ...] or --curriculum FILE "
                         "(or --merge SHARD_DIR ...)")
    if not args.merge:
        has_tasks = bool(args.tasks or args.suite)
        if has_tasks == bool(args.eval_jsonl):
            raise UsageError("give the evaluation sets: --tasks/--suite (lm-eval) or --eval-jsonl FILE "
                             "--text-key KEY, not both")
        if args.eval_jsonl and not args.text_key:
            raise UsageError("--eval-jsonl needs --text-key (the field(s) holding the text)")
    if args.ngram < 1:
        raise UsageError(f"--ngram {args.ngram} must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit} must be >= 1 (examples per task)")
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        raise UsageError(f"--shard-index {args.shard_index} must be in 0..--num-shards-1 "
                         f"({args.num_shards - 1})")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {args.out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists and is not empty; pass --overwrite to replace it")


def training_prefixes(args) -> list[str]:
    from megatron_ext.data.args import parse_data_path

    if args.data_path:
        return parse_data_path(args.data_path, "--data-path")[0]
    from megatron_ext.data.curriculum import SAMPLE_ROOT, load_curriculum

    cur = load_curriculum(args.curriculum)
    sample = None
    if cur.data_root == SAMPLE_ROOT:
        from megatron_ext.data.sample import prepare_sample_corpus

        sample = prepare_sample_corpus(tokenizer_model=args.tokenizer_model,
                                       tokenizer_type=args.tokenizer_type)["dir"]
    used = {name for stage in cur.stages for name in stage.weights}
    return [cur.resolve(src.prefix, sample) for name, src in cur.sources.items() if name in used]


def jsonl_examples(paths: list[str], keys: list[str], limit):
    """(task, None, [(index, row, text)]) per file; a missing key names FILE:LINE."""
    out = []
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"--eval-jsonl {path}: no such file")
        rows = []
        with open(path, encoding="utf-8") as f:
            try:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if limit is not None and len(rows) >= limit:
                        break
                    rows.append((len(rows), *jsonl_row(line, f"{path}:{line_no}", keys)))
            except UnicodeDecodeError as e:
                raise UsageError(f"--eval-jsonl {path}: not UTF-8 text ({e.reason} at byte "
                                 f"{e.start} of a line); expected JSON lines in UTF-8") from None
        if not rows:
            raise UsageError(f"--eval-jsonl {path}: no examples (the file is empty); expected "
                             "one JSON object per line")
        out.append((os.path.splitext(os.path.basename(path))[0], None, rows))
    return out


def jsonl_row(line: str, where: str, keys: list[str]):
    """(row, text) of one JSON line; one-line errors naming WHERE (FILE:LINE)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not JSON ({e.msg})") from None
    missing = [k for k in keys if not isinstance(row, dict) or k not in row]
    if missing:
        raise UsageError(f"{where}: no key '{missing[0]}' (--text-key {','.join(keys)})")
    try:  # JSON's "\ud800" escapes decode to lone surrogates no tokenizer takes
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{where}: has a lone surrogate {e.object[e.start]!r}; expected valid "
                         "Unicode text") from None
    return row, "\n".join(str(row[k]) for k in keys)


def eval_examples(spec: dict):
    """(task, Task or None, rows) for the evaluation sets `spec` (the recorded arguments) name."""
    if spec["eval_jsonl"]:
        return jsonl_examples(spec["eval_jsonl"], spec["text_key"].split(","), spec["limit"])
    from megatron_ext.evaluation import harness

    plan = harness.plan_tasks(spec["tasks"], spec["suite"], spec["include_path"], spec["task_cache"])
    harness.set_offline(plan)
    sets = harness.load_examples(plan, harness.task_manager(plan), spec["limit"])
    for task, _, rows in sets:
        if not rows:
            raise UsageError(f"task '{task}' has no evaluation examples")
    return sets


def tokenize(sets, spec: dict):
    import numpy as np

    from megatron_ext.data import build_tokenizer
    from megatron_ext.evaluation.decontam import EvalExample

    tok = build_tokenizer(spec["tokenizer_type"], spec["tokenizer_model"])
    examples = []
    for task, _, rows in sets:
        for index, doc, text in rows:
            ids = np.asarray(tok.tokenize(text), dtype=np.int64)
            examples.append(EvalExample(task, index, text, ids, doc))
    if examples and max(len(e.ids) for e in examples) < spec["ngram"]:
        raise UsageError(f"--ngram {spec['ngram']}: every evaluation example is shorter (the longest "
                         f"has {max(len(e.ids) for e in examples)} tokens), so none can be checked; "
                         "expected --ngram at most that")
    return examples


# ------------------------------------------------------------------------------ outputs
def clean_task_yaml(task, name: str, data: str):
    """The task's config pointed at the clean docs, or None if its templates are Python code."""
    config = task.config.to_dict()
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        value = config.get(key)
        if value is not None and not isinstance(value, (str, int, list)):
            return None
    drop = ("process_docs", "dataset_name", "training_split", "validation_split", "fewshot_split",
            "fewshot_config", "task_alias", "tag", "group", "dataset_kwargs")
    config = {k: v for k, v in config.items() if k not in drop and v is not None}
    config.update(task=name, dataset_path="json", dataset_kwargs={"data_files": {"test": data}},
                  test_split="test")
    return config


def write_clean(tmp: str, final: str, sets, rows_by_task: dict) -> dict:
    """clean/<task>.jsonl (+ <task>_clean.yaml for lm-eval tasks); returns what was written."""
    import yaml

    os.makedirs(os.path.join(tmp, "clean"))
    written = {}
    for task, task_obj, rows in sets:
        # Clean = checked and not contaminated: an example shorter than --ngram is unchecked.
        clean = {r["index"] for r in rows_by_task.get(task, []) if r["checked"] and not r["contaminated"]}
        keep = [doc for index, doc, _ in rows if index in clean]
        path = os.path.join(tmp, "clean", f"{task}_clean.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for doc in keep:
                f.write(json.dumps(doc, ensure_ascii=False, default=str) + "\n")
        entry = {"examples": len(keep), "jsonl": os.path.join(final, "clean", f"{task}_clean.jsonl")}
        if task_obj is not None and keep:  # an empty split is no task (datasets cannot load it)
            config = clean_task_yaml(task_obj, f"{task}_clean", entry["jsonl"])
            if config is not None:
                with open(os.path.join(tmp, "clean", f"{task}_clean.yaml"), "w", encoding="utf-8") as f:
                    yaml.safe_dump(config, f, allow_unicode=True, sort_keys=False)
                entry["task"] = f"{task}_clean"
        written[task] = entry
    return written


def eval_spec(args) -> dict:
    return {k: getattr(args, k) for k in EVAL_KEYS}


def run_shard(args):
    """Scan this shard of the training data; returns (spec, matched hashes, sources, scanned)."""
    from tqdm import tqdm

    from megatron_ext.evaluation import decontam

    spec = eval_spec(args)
    sets = eval_examples(spec)
    examples = tokenize(sets, spec)
    eval_set = decontam.eval_ngram_set(examples, args.ngram)
    where = "--data-path" if args.data_path else f"--curriculum {args.curriculum}"
    sources = decontam.open_sources(training_prefixes(args), where)
    total = sum(e - s for _, s, e in decontam.shard_ranges(sources, args.num_shards, args.shard_index))
    with tqdm(total=total, unit="tok", unit_scale=True, desc="scanning", file=sys.stderr) as bar:
        matched, scanned = decontam.scan(sources, eval_set, args.ngram, args.num_shards,
                                         args.shard_index, progress=bar.update)
    return spec, sets, examples, matched, sources, scanned


def write_report(out: str, spec: dict, sets, examples, matched, prefixes: list[str], scanned: int,
                 shards: int) -> dict:
    from megatron_ext.evaluation import decontam

    rows, totals = decontam.build_report(examples, matched, spec["ngram"])
    by_task: dict = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    with atomic_directory(out, "decon") as tmp:
        clean = write_clean(tmp, out, sets, by_task)
        for task, entry in clean.items():
            totals[task]["clean_subset"] = entry
        report = {"settings": {**spec, "training_prefixes": prefixes, "training_tokens_scanned": scanned,
                               "shards": shards, "rule": "contaminated = any shared n-gram of token ids"},
                  "tasks": totals, "matched_ngrams": int(len(matched)), "examples": rows}
        with open(os.path.join(tmp, REPORT_FILE), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
    return report


def merge(args) -> dict:
    import numpy as np

    shards = []
    for d in args.merge:
        path = os.path.join(d, SHARD_FILE)
        if not os.path.isfile(path):
            raise UsageError(f"--merge {d}: no {SHARD_FILE} (not a sharded decontamination output)")
        with open(path) as f:
            shards.append(json.load(f))
    first = shards[0]
    for d, s in zip(args.merge, shards):
        for key in ("spec", "prefixes", "num_shards"):
            if s[key] != first[key]:
                raise UsageError(f"--merge {d}: its {key} differs from {args.merge[0]}'s")
    have = sorted(s["shard_index"] for s in shards)
    if have != list(range(first["num_shards"])):
        missing = sorted(set(range(first["num_shards"])) - set(have))
        raise UsageError(f"--merge: shards {missing or 'duplicated'} of {first['num_shards']} missing")
    spec = first["spec"]
    sets = eval_examples(spec)
    examples = tokenize(sets, spec)
    matched = np.unique(np.array([h for s in shards for h in s["matched"]], dtype=np.uint64))
    return write_report(os.path.abspath(args.out), spec, sets, examples, matched, first["prefixes"],
                        sum(s["scanned"] for s in shards), first["num_shards"])


def summarize(report: dict) -> None:
    for task, t in report["tasks"].items():
        unchecked = (f", {t['unchecked']} unchecked (shorter than --ngram "
                     f"{report['settings']['ngram']} tokens)" if t["unchecked"] else "")
        print(f"{task:<32} {t['contaminated']:>5}/{t['checked']:<5} checked contaminated "
              f"({t['contaminated_share']:.1%}){unchecked}, mean coverage {t['mean_coverage']:.3f}, "
              f"longest {t['max_longest_match']} tokens", flush=True)


def main(argv=None) -> int:
    quiet_imports()
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        out = os.path.abspath(args.out)
        if args.merge:
            report = merge(args)
        else:
            spec, sets, examples, matched, sources, scanned = run_shard(args)
            prefixes = [s.prefix for s in sources]
            if args.num_shards > 1:
                with atomic_directory(out, "decon") as tmp:
                    with open(os.path.join(tmp, SHARD_FILE), "w") as f:
                        json.dump({"spec": spec, "prefixes": prefixes, "num_shards": args.num_shards,
                                   "shard_index": args.shard_index, "scanned": scanned,
                                   "matched": [int(h) for h in matched]}, f)
                print(f"wrote {out}/{SHARD_FILE}: shard {args.shard_index} of {args.num_shards}, "
                      f"{scanned:,} tokens, {len(matched)} evaluation n-grams found", flush=True)
                return 0
            report = write_report(out, spec, sets, examples, matched, prefixes, scanned, 1)
        summarize(report)
        print(f"wrote {out}/{REPORT_FILE} and {out}/clean/", flush=True)
        return 0
    except MarcoError as e:
        return fail(str(e))
    except OSError as e:
        return fail(f"writing --out {args.out} failed, nothing written: {e}")


if __name__ == "__main__":
    sys.exit(main())
