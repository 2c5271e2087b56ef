"""Checks of Megatron indexed datasets (.bin/.idx) that fail early with one clear line.

Megatron-Core's IndexedDataset asserts on a bad header and reads garbage from a truncated
file; these O(1) checks of the .idx layout written by IndexedDatasetBuilder run first.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from megatron_ext.data.errors import DataConfigError

IDX_MAGIC = b"MMIDIDX\x00\x00"  # the .idx format's magic bytes (format version 1)
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
MAX_SCAN_BYTES = 64 << 20  # scan small .bin files for token ids beyond the vocabulary


@dataclass(frozen=True)
class IndexedInfo:
    prefix: str
    dtype: np.dtype
    num_documents: int
    num_sequences: int  # what GPTDataset splits by (one per document unless sentence-split)
    num_tokens: int


def token_dtype(vocab_size: int) -> type:
    """uint16 while every id fits (Megatron's own rule), else int32 (e.g. Qwen3's 151,936)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def check_indexed_dataset(prefix: str, where: str, vocab_size: int | None = None) -> IndexedInfo:
    """Validate `prefix`.bin/.idx; `where` names the flag or file/stage that refers to it."""
    from megatron.core.datasets.indexed_dataset import DType

    idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"
    for path in (bin_, idx):
        if not os.path.isfile(path):
            raise DataConfigError(f"{where}: missing {path}")
    idx_size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise DataConfigError(f"{where}: corrupt index {idx}: {idx_size} bytes, shorter than the header")
    magic, version, code, n_seq, n_doc = _HEADER.unpack(raw)
    if magic != IDX_MAGIC or version != 1:
        raise DataConfigError(f"{where}: corrupt index {idx}: not a Megatron .idx header (v1)")
    try:
        dtype = np.dtype(DType.dtype_from_code(code))
    except ValueError:
        raise DataConfigError(f"{where}: corrupt index {idx}: unknown token dtype code {code}") from None
    expected = _HEADER.size + n_seq * (4 + 8) + n_doc * 8
    if idx_size != expected or n_doc < 1:
        raise DataConfigError(
            f"{where}: corrupt index {idx}: {idx_size} bytes, header says {expected}")
    mm = np.memmap(idx, mode="r", offset=_HEADER.size)
    lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq)
    pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=n_seq * 4)
    bin_size = os.path.getsize(bin_)
    end = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if n_seq else 0
    if end != bin_size:
        raise DataConfigError(
            f"{where}: {bin_} has {bin_size} bytes but its index describes {end}")
    if n_seq == 0:
        raise DataConfigError(f"{where}: {prefix} holds no documents")
    if vocab_size is not None:
        if vocab_size > np.iinfo(dtype).max + 1:
            raise DataConfigError(
                f"{where}: {prefix} stores {dtype.name} tokens, too narrow for the tokenizer's "
                f"{vocab_size} ids: prepared with another tokenizer?")
        if bin_size <= MAX_SCAN_BYTES:
            top = int(np.memmap(bin_, dtype=dtype, mode="r").max())
            if top >= vocab_size:
                raise DataConfigError(
                    f"{where}: {prefix} holds token id {top}, beyond the tokenizer's {vocab_size} "
                    "ids: prepared with another tokenizer?")
    return IndexedInfo(prefix, dtype, n_doc - 1, n_seq, int(bin_size // dtype.itemsize))


class IndexedOutputs:
    """Megatron indexed datasets (and side files) written under temporary names.

    `add(name, prefix, dtype)` opens an IndexedDatasetBuilder at `prefix`.tmp-PID.bin;
    `write_text(path, text)` writes path.tmp-PID. `publish()` finalizes the datasets and renames
    everything into place: datasets by name, each .idx after its .bin (an .idx marks a complete
    pair), then the side files (the last one can mark a complete set). Leaving the `with`
    block removes whatever was not published: a failed run leaves nothing half-written.
    """

    def __init__(self):
        self.tag = f".tmp-{os.getpid()}"
        self.builders: dict = {}  # name -> (IndexedDatasetBuilder, final prefix)
        self.texts: list[str] = []

    def __contains__(self, name) -> bool:
        return name in self.builders

    def __getitem__(self, name):
        return self.builders[name][0]

    def add(self, name, prefix: str, dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.builders[name] = (IndexedDatasetBuilder(f"{prefix}{self.tag}.bin", dtype=dtype), prefix)
        return self.builders[name][0]

    def write_text(self, path: str, text: str) -> None:
        with open(f"{path}{self.tag}", "w") as f:
            f.write(text)
        self.texts.append(path)

    def finalize(self) -> None:
        """Write the indices (before `write_text` of files that describe the datasets)."""
        for builder, prefix in self.builders.values():
            builder.finalize(f"{prefix}{self.tag}.idx")

    def publish(self) -> dict:
        """Rename into place (after `finalize`); returns {name: final prefix}."""
        for _, (_, prefix) in sorted(self.builders.items()):
            os.replace(f"{prefix}{self.tag}.bin", f"{prefix}.bin")
            os.replace(f"{prefix}{self.tag}.idx", f"{prefix}.idx")
        for path in self.texts:
            os.replace(f"{path}{self.tag}", path)
        return {name: prefix for name, (_, prefix) in sorted(self.builders.items())}

    def __enter__(self) -> "IndexedOutputs":
        return self

    def __exit__(self, *exc) -> None:
        for builder, _ in self.builders.values():
            builder.data_file.close()
        leftovers = [f"{p}{self.tag}{ext}" for _, p in self.builders.values() for ext in (".bin", ".idx")]
        for path in leftovers + [f"{p}{self.tag}" for p in self.texts]:
            if os.path.exists(path):
                os.remove(path)
