"""Data manifests: which released files make each curriculum source, and how to tokenize them.

    description: ...                       # optional
    tokenizer:                             # optional; default: the tiny SentencePiece model
      type: HuggingFaceTokenizer
      model: /models/qwen3                 # relative paths: to this file's directory
    append_eod: true                       # default true (Megatron-LM's --append-eod)
    json_keys: [text]                      # default text: the JSON key or column of the text
    files_per_task: 1                      # files of one source per shard (array task)
    sources:                               # names as in the curriculum's sources
      multilingual:
        inputs: [/raw/fineweb2/*/*.parquet, /raw/qa/*.jsonl.zst]   # files, globs, directories
        prefix: multilingual_text_document  # the curriculum's prefix (default NAME_text_document)
        json_keys: [content]                # optional, per source
      code: /raw/stack/*.parquet            # short form: inputs only

Globs are expanded sorted, patterns in the order given: that order is the documents' order.
`Manifest.shards()` cuts each source's files into groups of `files_per_task`; shard i is
task i of slurm/preprocess.sbatch's job array (data/shards.py). `${VAR}`s are expanded.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.data.curriculum import read_yaml
from megatron_ext.data.errors import DataConfigError

_TOP = {"description", "tokenizer", "append_eod", "json_keys", "files_per_task", "sources"}
_SOURCE = {"inputs", "prefix", "json_keys"}


@dataclass(frozen=True)
class ManifestSource:
    name: str
    patterns: tuple[str, ...]
    files: tuple[str, ...]  # expanded, in document order
    prefix: str  # the merged dataset's prefix, relative to the output directory
    json_key: str


@dataclass(frozen=True)
class Shard:
    index: int  # array task id
    source: str
    part: int  # shard number inside its source
    inputs: tuple[str, ...]
    json_key: str


@dataclass(frozen=True)
class Manifest:
    path: str
    tokenizer_type: str
    tokenizer_model: str | None
    append_eod: bool
    files_per_task: int
    sources: dict  # name -> ManifestSource, in file order

    def shards(self) -> list[Shard]:
        out = []
        for src in self.sources.values():
            for part, start in enumerate(range(0, len(src.files), self.files_per_task)):
                out.append(Shard(len(out), src.name, part,
                                 src.files[start:start + self.files_per_task], src.json_key))
        return out

    def check_files(self, names=None) -> None:
        """One line for the first source (of `names`, default all) without input files."""
        for name in names or self.sources:
            src = self.sources[name]
            if not src.files:
                raise DataConfigError(f"{self.path}: source '{name}' has no data: no file matches "
                                      f"{', '.join(src.patterns)}")


def _expand(value: str, where: str) -> str:
    out = os.path.expandvars(str(value))
    if "$" in out:
        raise DataConfigError(f"{where}: environment variable in {value!r} is not set")
    return out


def _files(pattern: str) -> list[str]:
    if os.path.isdir(pattern):  # a datasets save_to_disk directory is one input
        return [pattern]
    return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)
                  or os.path.isfile(os.path.join(p, "state.json")))


def load_manifest(path) -> Manifest:
    path = str(path)
    doc = read_yaml(path, f"manifest {path}")
    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), dict) or not doc["sources"]:
        raise DataConfigError(f"{path}: expected a mapping with 'sources' (name -> input files)")
    unknown = set(doc) - _TOP
    if unknown:
        raise DataConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}")
    base = Path(path).resolve().parent

    def local(p: str, where: str) -> str:
        p = _expand(p, where)
        return p if os.path.isabs(p) else str(base / p)

    tok = doc.get("tokenizer") or {}
    if not isinstance(tok, dict) or set(tok) - {"type", "model"}:
        raise DataConfigError(f"{path}: 'tokenizer' must be {{type: ..., model: ...}}")
    model = local(tok["model"], f"{path}: tokenizer") if tok.get("model") else None
    per_task = doc.get("files_per_task", 1)
    if isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 1:
        raise DataConfigError(f"{path}: files_per_task must be a positive integer, got {per_task!r}")
    keys = _json_keys(doc.get("json_keys", ["text"]), f"{path}: json_keys")

    sources = {}
    for name, spec in doc["sources"].items():
        where = f"{path}: source '{name}'"
        if isinstance(spec, (str, list)):
            spec = {"inputs": spec}
        if not isinstance(spec, dict) or "inputs" not in spec or set(spec) - _SOURCE:
            raise DataConfigError(f"{where}: expected input files/globs or "
                                  "{inputs: [...], prefix: ..., json_keys: [...]}")
        patterns = spec["inputs"] if isinstance(spec["inputs"], list) else [spec["inputs"]]
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise DataConfigError(f"{where}: 'inputs' must be a file, glob or list of them")
        patterns = tuple(local(p, where) for p in patterns)
        files = tuple(f for p in patterns for f in _files(p))
        prefix = _expand(spec.get("prefix", f"{name}_text_document"), where)
        key = _json_keys(spec.get("json_keys", keys), f"{where}: json_keys")
        sources[str(name)] = ManifestSource(str(name), patterns, files, prefix, key)
    return Manifest(path, str(tok.get("type", "SentencePieceTokenizer")), model,
                    bool(doc.get("append_eod", True)), per_task, sources)


def _json_keys(value, where: str) -> str:
    """One text field per source: the curriculum blends one dataset per source."""
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], str):
        raise DataConfigError(f"{where}: expected one key (a JSON key or column name), got {value!r}")
    return value[0]
