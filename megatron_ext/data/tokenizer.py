"""Tokenizers for data preparation and GPTDataset, built on Megatron-Core's own wrappers.

`build_tokenizer` returns a `megatron.core.tokenizers.MegatronTokenizerBase` (vocab_size, eod,
pad, tokenize, detokenize, unique_identifiers, ...), which is what GPTDatasetConfig expects.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from megatron_ext.data.errors import DataConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER_MODEL = REPO_ROOT / "data" / "tokenizer" / "marco_tiny_spm.model"
TOKENIZER_TYPES = {"SentencePieceTokenizer": "sentencepiece", "HuggingFaceTokenizer": "huggingface"}


def build_tokenizer(tokenizer_type: str = "SentencePieceTokenizer", tokenizer_model=None):
    """SentencePieceTokenizer (a .model file) or HuggingFaceTokenizer (a local HF directory)."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise DataConfigError(
            f"--tokenizer-type {tokenizer_type}: expected one of {', '.join(TOKENIZER_TYPES)}")
    path = Path(tokenizer_model) if tokenizer_model else DEFAULT_TOKENIZER_MODEL
    library = TOKENIZER_TYPES[tokenizer_type]
    if library == "sentencepiece" and not path.is_file():
        raise DataConfigError(f"--tokenizer-model {path}: no such SentencePiece model file")
    if library == "huggingface" and not path.is_dir():
        raise DataConfigError(
            f"--tokenizer-model {path}: expected a local Hugging Face tokenizer directory "
            "(tokenizer.json / tokenizer_config.json); hub names are not fetched")
    from megatron.core.tokenizers import MegatronTokenizer

    kwargs = {"use_fast": True} if library == "huggingface" else {}
    try:
        tok = MegatronTokenizer.from_pretrained(
            tokenizer_path=str(path), metadata_path={"library": library}, **kwargs)
        eod = tok.eod
    except Exception as e:  # the libraries raise anything from RuntimeError to OSError
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataConfigError(
            f"--tokenizer-model {path}: cannot load as {tokenizer_type}: {reason}") from None
    if eod is None or not 0 <= eod < tok.vocab_size:
        raise DataConfigError(f"--tokenizer-model {path}: no end-of-document (EOS) token")
    return tok


def build_tokenizer_from_options(opts):
    """The tokenizer that `DataOptions` (tokenizer_type, tokenizer_model) names."""
    return build_tokenizer(opts.tokenizer_type, opts.tokenizer_model)


def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """The model's (padded) embedding table must hold every token id."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataConfigError(
            f"--tokenizer-model {tokenizer.path}: tokenizer has {tokenizer.vocab_size} tokens, "
            f"more than the model's vocabulary of {model_vocab_size}")


def tokenizer_info(tokenizer_type: str, tokenizer_model=None) -> dict:
    """What a checkpoint records about its tokenizer (type, path, content hash)."""
    path = Path(tokenizer_model) if tokenizer_model else DEFAULT_TOKENIZER_MODEL
    files = [path] if path.is_file() else sorted(
        f for f in path.glob("*") if f.suffix in (".json", ".model", ".txt") and f.is_file())
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return {"tokenizer_type": tokenizer_type, "tokenizer_model": str(path),
            "sha256": digest.hexdigest() if files else None}
