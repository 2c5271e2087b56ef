"""Safetensors on both sides of the conversion, never holding a whole checkpoint.

  HFSafetensors       reads an HF directory (one `model.safetensors`, or shards listed by
                      `model.safetensors.index.json`): every header up front (which also
                      catches truncated files and lets callers check names and shapes before
                      any work), tensor data only when asked, one file opened per read.
  SafetensorsWriter   writes HF shards whose headers are laid out up front (names and shapes
                      are known from the architecture), so each tensor is written as soon as it
                      is produced and no shard is ever held in memory.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Mapping

import torch

from megatron_ext.errors import ConversionError


class HFSafetensors:
    """Lazy access to the tensors of an HF directory: headers are read up front (which also
    catches truncated files), tensor data only on `get`, each file opened only for that read
    so no mapping of the whole checkpoint stays resident."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ConversionError(f"--hf-dir {directory}: unreadable "
                                      f"model.safetensors.index.json ({e})") from None
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            raise ConversionError(f"--hf-dir {directory}: no model.safetensors or "
                                  "model.safetensors.index.json")
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, str] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise ConversionError(f"--hf-dir {directory}: shard {name} listed in the "
                                      "index is missing")
            for key, shape, dtype in _read_header(path, directory):
                self.file_of[key], self.shapes[key], self.dtypes[key] = path, shape, dtype

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def dtype(self) -> torch.dtype:
        """The floating-point dtype the weights are stored in (the most common one)."""
        names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
        counts: dict[str, int] = {}
        for d in self.dtypes.values():
            counts[d] = counts.get(d, 0) + 1
        return names.get(max(counts, key=counts.get), torch.float32)

    def require(self, expected: Mapping[str, tuple]) -> None:
        """Every name present with the given shape, or one error naming the first problem."""
        for name, shape in expected.items():
            if name not in self.file_of:
                raise ConversionError(f"--hf-dir {self.directory}: tensor {name} is missing")
            if tuple(self.shapes[name]) != tuple(shape):
                raise ConversionError(
                    f"--hf-dir {self.directory}: tensor {name} has shape "
                    f"{tuple(self.shapes[name])}, config.json implies {tuple(shape)}")

    def get_many(self, names) -> dict:
        from safetensors import safe_open

        by_file: dict[str, list] = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        out = {}
        for path, keys in by_file.items():
            with safe_open(path, "pt") as f:
                out.update({k: f.get_tensor(k) for k in keys})
        return out

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]


def _read_header(path: str, directory: str):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            return [(k, tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                    for k in f.keys()]
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"--hf-dir {directory}: {os.path.basename(path)} is unreadable "
                              f"(truncated or corrupt: {e})") from None


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class SafetensorsWriter:
    """HF safetensors shards (+ `model.safetensors.index.json` when more than one).

    `plan` lists (name, shape) in the order tensors will be given to `add`; shards are cut
    greedily at `max_shard_bytes` (a tensor larger than that gets a shard of its own), the same
    naming as `save_pretrained` (`model.safetensors`, or `model-0000k-of-0000n.safetensors`).
    """

    def __init__(self, directory: str, plan: list, dtype: torch.dtype, max_shard_bytes: int):
        self.directory, self.dtype = directory, dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        shards, size = [[]], 0
        for name, shape in plan:
            nbytes = itemsize * int(torch.Size(shape).numel())
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), nbytes))
            size += nbytes
        n = len(shards)
        self.files = (["model.safetensors"] if n == 1 else
                      [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
        self.shards = shards
        self.order = [name for shard in shards for name, _, _ in shard]
        self.shard_of = {name: k for k, shard in enumerate(shards) for name, _, _ in shard}
        self.shapes = {name: shape for shard in shards for name, shape, _ in shard}
        self.total_bytes = sum(b for shard in shards for _, _, b in shard)
        self._next, self._shard, self._file, self._pending = 0, -1, None, {}

    def _open(self, k: int) -> None:
        if self._file is not None:
            self._file.close()
        header, offset = {}, 0
        for name, shape, nbytes in self.shards[k]:
            header[name] = {"dtype": _ST_DTYPES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._file = open(os.path.join(self.directory, self.files[k]), "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = k

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write every tensor whose turn has come; others wait (callers give whole layers)."""
        self._pending.update(tensors)
        while self._next < len(self.order) and self.order[self._next] in self._pending:
            name = self.order[self._next]
            if self.shard_of[name] != self._shard:
                self._open(self.shard_of[name])
            t = self._pending.pop(name).to(self.dtype).contiguous()
            if tuple(t.shape) != self.shapes[name]:
                raise RuntimeError(f"{name}: shape {tuple(t.shape)}, planned {self.shapes[name]}")
            self._file.write(t.reshape(-1).view(torch.uint8).numpy())  # no extra copy
            self._next += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._next != len(self.order) or self._pending:
            missing = self.order[self._next] if self._next < len(self.order) else None
            raise RuntimeError(f"safetensors export incomplete: next {missing}, "
                               f"unexpected {sorted(self._pending)[:3]}")
        if len(self.files) > 1:
            weight_map = {name: self.files[k] for name, k in self.shard_of.items()}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
