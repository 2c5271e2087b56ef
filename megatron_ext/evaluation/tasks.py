"""Offline evaluation tasks made from the bundled data, as lm-eval YAML with local JSON files.

Two task families, one task per language plus a group that averages them (weighted by size):

  marco_continuation_<lang>   multiple choice: a paragraph of a held-out manual page cut at a
                              word boundary (a character count for zh/ja); pick its true
                              continuation among four (the three others are continuations of
                              other held-out paragraphs of the same language). Paragraphs that
                              occur verbatim in any training split are skipped. Metrics acc,
                              acc_norm (per byte) and acc_mutual_info (log P(choice | context) -
                              log P(choice): what the context adds, the score that separates a
                              model that reads the context from one that prefers a priori likely
                              text); chance is 0.25.
  marco_manqa_<lang>          generation: "Question: <the SFT sample's held-out question, in
                              the page's language, e.g. 'What does the command X do?'>\\nAnswer:"
                              -> the page's NAME line ("X - description"), verbatim. Metrics chrF
                              and exact match (case and surrounding whitespace ignored).

Sources: `data/corpus/<lang>.valid.jsonl.gz`, the held-out split the trainer never reads, and
the held-out split of the SFT sample (`data/sft/valid.jsonl.gz`, conversations of kind
"name"; its held-out commands are never in its training split). Without the SFT sample the QA
task is built from the corpus's held-out pages with the same recipe (an English question). So
the tasks are clean by construction (tools/decontaminate.py checks it against the training
data). Generation is deterministic. lm-eval resolves `data_files` against the working directory,
so the YAMLs carry absolute paths and are generated where they are used (`ensure_bundled_tasks`:
a cache directory keyed by the corpus and this recipe's version) instead of being committed.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import random
import re
from typing import Iterator, Optional

import yaml

from megatron_ext.cli import atomic_directory

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(REPO, "data", "corpus")
SFT_VALID = os.path.join(REPO, "data", "sft", "valid.jsonl.gz")
RECIPE_VERSION = 3
PREFIXES = ("marco_continuation", "marco_manqa")
NO_SPACES = {"zh", "ja"}
PER_LANGUAGE = 24          # at most this many multiple-choice examples per language
QUESTION = "Question: {{question}}\nAnswer:"
NAME_LINE = re.compile(r"^\s*(\S[^\n]{0,100}?)\s+[-\u2014\u2013]\s+(\S.*)$")


def read_corpus(path: str) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def languages(corpus: str = CORPUS) -> list[str]:
    files = glob.glob(os.path.join(corpus, "*.valid.jsonl.gz"))
    return sorted(os.path.basename(p).split(".")[0] for p in files)


def _stable(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------ examples
def _split_paragraph(p: str, lang: str) -> Optional[tuple[str, str]]:
    """(context, continuation) of one paragraph, or None if it is too short."""
    if lang in NO_SPACES:
        if len(p) < 60:
            return None
        cut = min(len(p) // 2, 120)
        return p[:cut], p[cut:cut + 24]
    if len(p) < 120:
        return None
    cut = p.rfind(" ", 0, min(len(p) // 2, 240))
    if cut < 40:
        return None
    end = p.find(" ", cut + 50)
    end = len(p) if end < 0 or end > cut + 90 else end
    continuation = p[cut:end]
    return (p[:cut], continuation) if len(continuation.split()) >= 4 else None


def training_paragraphs(corpus: str = CORPUS) -> set[str]:
    """Every paragraph of every language's training split (translated pages keep untranslated
    English paragraphs, so a held-out page can repeat a training page word for word)."""
    seen = set()
    for path in sorted(glob.glob(os.path.join(corpus, "*.train.jsonl.gz"))):
        for doc in read_corpus(path):
            seen.update(p.strip() for p in doc["text"].split("\n"))
    return seen


def continuation_examples(lang: str, corpus: str = CORPUS, per_language: int = PER_LANGUAGE,
                          seed: int = 0, exclude: frozenset | set = frozenset()) -> list[dict]:
    """Paragraphs of held-out pages not found verbatim in `exclude` (the training paragraphs)."""
    pairs = []
    for doc in read_corpus(os.path.join(corpus, f"{lang}.valid.jsonl.gz")):
        for p in doc["text"].split("\n"):
            if p.strip() in exclude:
                continue
            split = _split_paragraph(p.strip(), lang)
            if split:
                pairs.append((_stable(p), split, doc["source"]))
    pairs.sort()
    rng = random.Random(f"{seed}-{lang}")
    chosen = pairs[:per_language]
    endings = [s[1] for _, s, _ in pairs]
    examples = []
    for _, (context, answer), source in chosen:
        others = sorted({e for e in endings if e != answer})
        if len(others) < 3:
            continue
        choices = rng.sample(others, 3)
        label = rng.randrange(4)
        choices.insert(label, answer)
        examples.append({"context": context, "choices": choices, "label": label, "lang": lang,
                         "source": source})
    return examples


def name_line(text: str) -> Optional[tuple[str, str]]:
    """(command, NAME line) of a page: its first 'names - description' line."""
    for line in text.split("\n")[:4]:
        m = NAME_LINE.match(line)
        if m:
            command = m.group(1).split(",")[0].strip()
            if command and " " not in command:
                return command, line.strip()
    return None


def manqa_examples(lang: str, corpus: str = CORPUS, sft: Optional[str] = SFT_VALID) -> list[dict]:
    """The SFT sample's held-out "name" questions of `lang`, else the corpus recipe."""
    if sft and os.path.isfile(sft):
        out = []
        for conv in read_corpus(sft):
            if conv.get("lang") == lang and conv.get("kind") == "name":
                user = [m["content"] for m in conv["messages"] if m["role"] == "user"]
                answer = [m["content"] for m in conv["messages"] if m["role"] == "assistant"]
                out.append({"question": user[0], "answer": answer[0], "command": conv.get("command"),
                            "lang": lang, "source": conv.get("source")})
        return out
    out = []
    for doc in read_corpus(os.path.join(corpus, f"{lang}.valid.jsonl.gz")):
        found = name_line(doc["text"])
        if found:
            out.append({"question": f"What does the command {found[0]} do?", "answer": found[1],
                        "command": found[0], "lang": lang, "source": doc["source"]})
    return out


# ------------------------------------------------------------------------------ task files
def _data_files(path: str) -> dict:
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": path}},
            "test_split": "test"}


def continuation_task(name: str, data: str, lang: str) -> dict:
    return {"task": name, "tag": ["marco_bundled"], **_data_files(data),
            "output_type": "multiple_choice", "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "label", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_mutual_info", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": float(RECIPE_VERSION), "language": lang, "group": "bundled",
                         "metric": "acc", "chance": 0.25}}


def manqa_task(name: str, data: str, lang: str) -> dict:
    return {"task": name, "tag": ["marco_bundled"], **_data_files(data),
            "output_type": "generate_until", "doc_to_text": QUESTION,
            "doc_to_target": "{{answer}}", "target_delimiter": " ",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 48, "do_sample": False},
            "metric_list": [
                {"metric": "chrf", "aggregation": "chrf", "higher_is_better": True},
                {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                 "ignore_case": True, "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
            "metadata": {"version": float(RECIPE_VERSION), "language": lang, "group": "bundled",
                         "metric": "chrf"}}


def group_file(group: str, tasks: list[str], metrics: list[str]) -> dict:
    return {"group": group, "task": tasks,
            "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": True}
                                      for m in metrics],
            "metadata": {"version": float(RECIPE_VERSION)}}


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_yaml(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, allow_unicode=True, sort_keys=False)


def write_bundled_tasks(out: str, corpus: str = CORPUS, per_language: int = PER_LANGUAGE) -> dict:
    """Write every bundled task (YAML + JSONL) into `out`; returns {task: number of examples}."""
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    counts: dict[str, int] = {}
    groups: dict[str, list[str]] = {p: [] for p in PREFIXES}
    seen = training_paragraphs(corpus)
    for lang in languages(corpus):
        for prefix, rows, make in (
                ("marco_continuation", continuation_examples(lang, corpus, per_language, exclude=seen),
                 continuation_task),
                ("marco_manqa", manqa_examples(lang, corpus), manqa_task)):
            if not rows:
                continue
            name = f"{prefix}_{lang}"
            data = os.path.join(out, f"{name}.jsonl")
            _write_jsonl(data, rows)
            _write_yaml(os.path.join(out, f"{name}.yaml"), make(name, data, lang))
            groups[prefix].append(name)
            counts[name] = len(rows)
    _write_yaml(os.path.join(out, "marco_continuation.yaml"),
                group_file("marco_continuation", groups["marco_continuation"], ["acc", "acc_norm"]))
    _write_yaml(os.path.join(out, "marco_manqa.yaml"),
                group_file("marco_manqa", groups["marco_manqa"], ["exact_match"]))
    return counts


def corpus_fingerprint(corpus: str = CORPUS, sft: Optional[str] = SFT_VALID) -> str:
    digest = hashlib.sha256(f"recipe {RECIPE_VERSION} per {PER_LANGUAGE}".encode())
    extra = [sft] if sft and os.path.isfile(sft) else []
    for path in sorted(glob.glob(os.path.join(corpus, "*.valid.jsonl.gz"))) + extra:
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:16]


def default_cache() -> str:
    root = os.environ.get("MARCO_EVAL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "marco-megatron", "eval_tasks")
    return root


def ensure_bundled_tasks(cache: Optional[str] = None) -> str:
    """The directory of the bundled tasks, generated once per corpus version (atomically)."""

    target = os.path.join(cache or default_cache(), corpus_fingerprint())
    if not os.path.isfile(os.path.join(target, "marco_continuation.yaml")):
        with atomic_directory(target, "tasks") as tmp:
            write_bundled_tasks(tmp)
            # the YAMLs name their data by absolute path: point them at the final directory
            for name in os.listdir(tmp):
                if name.endswith(".yaml"):
                    path = os.path.join(tmp, name)
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(text.replace(os.path.abspath(tmp), target))
    return target


def is_bundled(task: str) -> bool:
    return task.startswith(PREFIXES) or task == "marco_bundled"
