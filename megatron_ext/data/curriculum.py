"""Curriculum files: ordered stages with token boundaries, each a blend of sources.

    data_root: ${MARCO_DATA_ROOT}       # prefixes below are relative to it; "@sample" = the
                                        # bundled corpus, prepared with the run's tokenizer
    sources:                            # name -> indexed-dataset prefix [+ language]
      en_web: en/web_text_document
      de: {prefix: de_train_text_document, lang: de}
    validation:                         # optional: name -> prefix, one validation loss each
      de: de_valid_text_document
    stages:
      - name: stage1
        end: 2.4T                       # cumulative token boundary (K, M, B, T or an integer)
        languages: [en, de]
        blend: {en_web: 70, de: 30}     # relative weights; 0 leaves a source out of the stage
      - name: stage2
        start: 2.4T                     # optional; must equal the previous stage's end
        end: 4.1T
        ...

Stage k covers global steps [ceil(start / tokens_per_step), ceil(end / tokens_per_step)).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext.data.errors import DataConfigError

SAMPLE_ROOT = "@sample"
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_TOKENS_RE = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([KMBGT]?)\s*$", re.I)


@dataclass(frozen=True)
class Source:
    name: str
    prefix: str  # absolute, or relative to the curriculum's data root
    lang: str | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    start_tokens: int
    end_tokens: int
    weights: dict[str, float]  # source name -> weight > 0 (zero weights dropped)
    languages: tuple[str, ...] = ()

    def step_range(self, tokens_per_step: int) -> tuple[int, int]:
        return (math.ceil(self.start_tokens / tokens_per_step),
                math.ceil(self.end_tokens / tokens_per_step))


@dataclass
class Curriculum:
    path: str
    data_root: str | None
    sources: dict[str, Source]
    stages: list[Stage]
    validation: dict[str, str] = field(default_factory=dict)

    def resolve(self, prefix: str, sample_root: str | None = None) -> str:
        """Absolute prefix; `sample_root` is the prepared bundled corpus for "@sample"."""
        root = sample_root if self.data_root == SAMPLE_ROOT else self.data_root
        if os.path.isabs(prefix) or not root:
            return prefix
        return os.path.join(root, prefix)


def parse_tokens(value, where: str) -> int:
    """2.4T, 300K, 1_000_000 or 5000 -> an integer token count."""
    if isinstance(value, bool):
        raise DataConfigError(f"{where}: expected a token count, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    else:
        m = _TOKENS_RE.match(str(value))
        if not m:
            raise DataConfigError(f"{where}: expected a token count like 2.4T, 300K or 5000, got {value!r}")
        n = round(float(m.group(1).replace("_", "")) * _SUFFIX[m.group(2).upper()])
    if n < 0:
        raise DataConfigError(f"{where}: token count must be >= 0, got {value!r}")
    return n


def _expand(value: str, where: str) -> str:
    out = os.path.expandvars(value)
    missing = re.findall(r"\$\{?(\w+)", out)
    if missing:
        raise DataConfigError(f"{where}: environment variable ${missing[0]} is not set")
    return out


def read_yaml(path: str, where: str):
    """A data YAML file (curriculum, manifest) parsed safely; unreadable is one line naming
    `where` ("--curriculum PATH"), invalid YAML one line with PATH:LINE."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise DataConfigError(f"{where}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise DataConfigError(f"{path}:{line} invalid YAML ({getattr(e, 'problem', e)})") from None


def load_curriculum(path) -> Curriculum:
    path = str(path)
    doc = read_yaml(path, f"--curriculum {path}")
    if not isinstance(doc, dict):
        raise DataConfigError(f"{path}: expected a mapping with 'sources' and 'stages'")
    unknown = set(doc) - {"data_root", "sources", "validation", "stages", "description"}
    if unknown:
        raise DataConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}")

    root = doc.get("data_root")
    if root is not None and root != SAMPLE_ROOT:
        root = _expand(str(root), f"{path}: data_root")
        if not os.path.isabs(root):  # relative to the curriculum file
            root = str(Path(path).resolve().parent / root)

    sources = {}
    raw_sources = doc.get("sources")
    if not isinstance(raw_sources, dict) or not raw_sources:
        raise DataConfigError(f"{path}: 'sources' must map source names to dataset prefixes")
    for name, spec in raw_sources.items():
        where = f"{path}: source '{name}'"
        if isinstance(spec, str):
            spec = {"prefix": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("prefix"), str):
            raise DataConfigError(f"{where}: expected a prefix string or {{prefix: ..., lang: ...}}")
        lang = spec.get("lang")
        sources[str(name)] = Source(str(name), _expand(spec["prefix"], where),
                                    None if lang is None else str(lang))

    validation = {}
    raw_valid = doc.get("validation") or {}
    if not isinstance(raw_valid, dict):
        raise DataConfigError(f"{path}: 'validation' must map names to dataset prefixes")
    for name, prefix in raw_valid.items():
        if not isinstance(prefix, str):
            raise DataConfigError(f"{path}: validation '{name}': expected a prefix string")
        validation[str(name)] = _expand(prefix, f"{path}: validation '{name}'")

    raw_stages = doc.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise DataConfigError(f"{path}: 'stages' must be a non-empty list")
    stages, prev_end, names = [], 0, set()
    for i, st in enumerate(raw_stages, 1):
        if not isinstance(st, dict):
            raise DataConfigError(f"{path}: stage {i}: expected a mapping")
        name = str(st.get("name", f"stage{i}"))
        where = f"{path}: stage {i} '{name}'"
        if name in names:
            raise DataConfigError(f"{where}: duplicate stage name")
        names.add(name)
        bad = set(st) - {"name", "start", "end", "blend", "languages", "description"}
        if bad:
            raise DataConfigError(f"{where}: unknown key(s) {sorted(bad)}")
        if "end" not in st:
            raise DataConfigError(f"{where}: missing 'end' (cumulative token boundary)")
        end = parse_tokens(st["end"], f"{where}: end")
        start = parse_tokens(st["start"], f"{where}: start") if "start" in st else prev_end
        if start < prev_end:
            raise DataConfigError(f"{where}: starts at {start} tokens, overlapping the previous "
                                  f"stage, which ends at {prev_end}")
        if start > prev_end:
            raise DataConfigError(f"{where}: starts at {start} tokens, leaving a gap after "
                                  f"{prev_end}")
        if end <= start:
            raise DataConfigError(f"{where}: end {end} must be after its start {start} "
                                  "(boundaries must increase)")
        blend = st.get("blend")
        if not isinstance(blend, dict) or not blend:
            raise DataConfigError(f"{where}: 'blend' must map source names to weights")
        weights = {}
        for src, w in blend.items():
            if src not in sources:
                raise DataConfigError(f"{where}: blend names unknown source '{src}'")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise DataConfigError(f"{where}: weight of '{src}' must be a number, got {w!r}")
            if w < 0:
                raise DataConfigError(f"{where}: weight of '{src}' is negative ({w})")
            if w > 0:
                weights[str(src)] = float(w)
        if not weights:
            raise DataConfigError(f"{where}: all blend weights are zero")
        langs = st.get("languages") or []
        if not isinstance(langs, list):
            raise DataConfigError(f"{where}: 'languages' must be a list of language codes")
        langs = tuple(str(x) for x in langs)
        if langs:
            outside = sorted({sources[s].lang for s in weights} - set(langs) - {None})
            if outside:
                raise DataConfigError(f"{where}: blend uses language(s) {outside} not in its "
                                      f"languages list")
        stages.append(Stage(name, start, end, weights, langs))
        prev_end = end
    return Curriculum(path, root, sources, stages, validation)
