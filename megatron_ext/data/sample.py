"""The bundled sample corpus (data/corpus), tokenized once into a cache directory.

The cache key hashes the corpus manifest and the tokenizer files, so a new corpus or tokenizer
prepares a new copy. Preparation writes a temporary directory and renames it into place:
concurrent preparers (one per node) cannot leave a half-written cache. `prepared_dir` and
`once_per_node` serve the bundled SFT sample (posttrain/sft_data.py) too.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from megatron_ext.data.errors import DataConfigError
from megatron_ext.data.preprocess import preprocess
from megatron_ext.data.tokenizer import DEFAULT_TOKENIZER_MODEL, REPO_ROOT

CORPUS_DIR = REPO_ROOT / "data" / "corpus"
_FORMAT = "1"  # bump when the prepared layout changes


def default_cache_root() -> Path:
    return Path(os.environ.get("MARCO_CACHE") or Path.home() / ".cache" / "marco-megatron")


def _cache_key(tokenizer_type: str, tokenizer_model: Path) -> str:
    h = hashlib.sha256(f"{_FORMAT} {tokenizer_type}\n".encode())
    h.update((CORPUS_DIR / "manifest.json").read_bytes())
    files = [tokenizer_model] if tokenizer_model.is_file() else sorted(
        f for f in tokenizer_model.iterdir() if f.is_file())
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def prepare_sample_corpus(cache_dir=None, tokenizer_model=None,
                          tokenizer_type: str = "SentencePieceTokenizer") -> dict:
    """Tokenize data/corpus/<lang>.{train,valid}.jsonl.gz unless already cached.

    Returns {"dir": ..., "train": {lang: prefix}, "valid": {lang: prefix},
    "train_tokens": {lang: n}, "valid_tokens": {lang: n}} with absolute prefixes.
    """

    if not (CORPUS_DIR / "manifest.json").is_file():
        raise DataConfigError(f"sample corpus: {CORPUS_DIR}/manifest.json is missing")
    model = Path(tokenizer_model) if tokenizer_model else DEFAULT_TOKENIZER_MODEL
    if not model.exists():
        raise DataConfigError(f"--tokenizer-model {model}: no such file or directory")
    root = Path(cache_dir) if cache_dir else default_cache_root()

    def fill(tmp: Path, out: Path) -> dict:
        langs = json.loads((CORPUS_DIR / "manifest.json").read_text())["languages"]
        info = {"dir": str(out), "train": {}, "valid": {}, "train_tokens": {}, "valid_tokens": {}}
        for lang in sorted(langs):
            for split in ("train", "valid"):
                stats = preprocess([CORPUS_DIR / f"{lang}.{split}.jsonl.gz"], str(tmp / f"{lang}_{split}"),
                                   tokenizer_type=tokenizer_type, tokenizer_model=str(model),
                                   append_eod=True, workers=1, progress=False)
                info[split][lang] = str(out / f"{lang}_{split}_text_document")
                info[f"{split}_tokens"][lang] = stats.tokens
        return info

    return prepared_dir(root / "sample_corpus" / _cache_key(tokenizer_type, model), fill)


def prepared_dir(out: Path, fill) -> dict:
    """The `prepared.json` of cache directory `out`, made first if missing: `fill(tmp, out)`
    writes the files into a temporary sibling and returns the info recorded as prepared.json;
    the directory is then renamed into place (a concurrent preparer's identical copy wins)."""
    done = out / "prepared.json"
    if done.is_file():
        return json.loads(done.read_text())
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = fill(tmp, out)
        (tmp / "prepared.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first: its copy is identical
            if not done.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads(done.read_text())


def once_per_node(prepare):
    """prepare() on local rank 0 first, then on the other ranks (which then find it cached);
    without torch.distributed just prepare()."""
    import torch

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return prepare()
    first = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    info = prepare() if first else None
    dist.barrier()
    return info if first else prepare()
