"""Streaming conversion between Megatron-Core checkpoints and Hugging Face directories.

The weight mapping itself is `hf_mapping`; this module moves the tensors, one layer at a time:

  McoreCheckpointReader   reads one layer (or the embedding / final norm) of a torch_dist
                          checkpoint saved at any TP/PP/EP/DP layout: a DCP load of just that
                          chunk of each global tensor (DCP reshards from the saved chunks).
  SafetensorsWriter       writes HF shards whose headers are laid out up front (names and shapes
                          are known from the architecture), so each tensor is written as soon as
                          it is produced and no shard is ever held in memory.
  HFCheckpointSource      the reverse: a chunk producer for `streaming_checkpoint.save_streaming`
                          that converts one HF layer at a time.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_ext.convert import mapping as hm
from megatron_ext.errors import ConversionError


# ------------------------------------------------------------------------------------------
# Megatron checkpoint -> tensors, a chunk at a time
# ------------------------------------------------------------------------------------------
class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Reads the requested chunk of each requested global tensor into a given buffer."""

    def __init__(self, requests: Mapping[str, tuple]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.requests = requests  # key -> (global offsets, destination tensor)

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, dest) in self.requests.items():
            chunk = ChunkStorageMetadata(torch.Size(offsets), dest.shape)
            items += create_read_items_for_chunk_list(
                key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        # The default planner's own narrowing of the destination to this read.
        return self.transform_tensor(read_item, self.requests[read_item.dest_index.fqn][1])


class McoreCheckpointReader:
    """The model tensors of one Megatron checkpoint directory (`iter_N`), read lazily.

    Checks up front that every tensor the architecture needs is there with its global shape
    (`where` names the flag in error messages)."""

    def __init__(self, ckpt_dir: str, preset, where: str = "--load"):
        self.ckpt_dir, self.preset = ckpt_dir, preset
        try:
            md = dcp.FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata
        except Exception as e:  # noqa: BLE001 - missing or corrupt .metadata
            raise ConversionError(f"{where} {ckpt_dir}: unreadable checkpoint metadata "
                                  f"({type(e).__name__}: {e})") from None
        L = preset.num_layers
        self.layer_shapes = hm.mcore_layer_shapes(preset)
        self.global_shapes = hm.mcore_global_shapes(preset)
        expected = {hm.MCORE_LAYERS + k: (L, *v) for k, v in self.layer_shapes.items()}
        expected.update(self.global_shapes)
        present = [k for k in expected if isinstance(md.get(k), TensorStorageMetadata)]
        if not present:
            raise ConversionError(f"{where} {ckpt_dir}: the checkpoint holds no model weights "
                                  f"(no {next(iter(self.global_shapes))})")
        for key, shape in expected.items():
            if key not in present:
                raise ConversionError(f"{where} {ckpt_dir}: model tensor {key} is missing "
                                      f"(needed by {preset.name!r} in marco_model.json)")
            if tuple(md[key].size) != tuple(shape):
                raise ConversionError(
                    f"{where} {ckpt_dir}: tensor {key} has shape {tuple(md[key].size)}, "
                    f"marco_model.json implies {tuple(shape)}")
        self.dtypes = {k: md[k].properties.dtype for k in expected}

    @property
    def dtype(self) -> torch.dtype:
        return self.dtypes["embedding.word_embeddings.weight"]

    def _read(self, requests: dict) -> dict:
        """key -> (offsets, shape) => key -> tensor (in the stored dtype)."""
        bufs = {k: (off, torch.empty(shape, dtype=self.dtypes[k])) for k, (off, shape) in requests.items()}
        # A single process reads (no process group): DCP plans and reads locally.
        dcp.load({}, storage_reader=dcp.FileSystemReader(self.ckpt_dir),
                 planner=_ChunkLoadPlanner(bufs), no_dist=True)
        return {k: buf for k, (_, buf) in bufs.items()}

    def layer(self, i: int) -> dict:
        """Layer i's tensors by Megatron per-layer name (layer axis removed)."""
        requests = {hm.MCORE_LAYERS + n: ((i,) + (0,) * len(s), (1, *s))
                    for n, s in self.layer_shapes.items()}
        out = self._read(requests)
        return {k[len(hm.MCORE_LAYERS):]: v[0] for k, v in out.items()}

    def globals(self) -> dict:
        """Embedding, final norm (and untied output layer) by Megatron name."""
        return self._read({k: ((0,) * len(s), s) for k, s in self.global_shapes.items()})


def export_tensors(reader: McoreCheckpointReader, on_layer=None) -> Iterable[dict]:
    """HF tensors (full names) in file order: embedding, then layer by layer, then the rest."""
    layout = hm.AttentionLayout.from_preset(reader.preset)
    glob = {hm.GLOBAL_RENAMES[k]: v for k, v in reader.globals().items()}
    yield {"model.embed_tokens.weight": glob.pop("model.embed_tokens.weight")}
    for i in range(reader.preset.num_layers):
        layer = hm.mcore_to_hf_layer(reader.layer(i), layout)
        yield {hm.hf_layer_prefix(i) + k: v for k, v in layer.items()}
        if on_layer is not None:
            on_layer(i)
    yield glob


# ------------------------------------------------------------------------------------------
# Safetensors shards, written as tensors arrive
# ------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------
# HF directory -> Megatron chunks (for streaming_checkpoint.save_streaming)
# ------------------------------------------------------------------------------------------
class HFCheckpointSource:
    """Chunks of the Megatron checkpoint of a `qwen3` / `qwen3_moe` HF directory; one HF layer
    is read and converted at a time (the writer goes layer by layer)."""

    def __init__(self, reader: hm.HFSafetensors, preset, on_layer=None):
        self.reader, self.preset, self.on_layer = reader, preset, on_layer
        self.layout = hm.AttentionLayout.from_preset(preset)
        self._index, self._layer = None, {}

    def _load_layer(self, i: int) -> None:
        p = hm.hf_layer_prefix(i)
        names = [n for n in self.reader.file_of if n.startswith(p)]
        hf = {k[len(p):]: v for k, v in self.reader.get_many(names).items()}
        self._layer = hm.hf_to_mcore_layer(hf, self.layout, moe=self.preset.is_moe)
        self._index = i
        if self.on_layer is not None:
            self.on_layer(i)

    def chunk(self, key: str, offsets: tuple, sizes: tuple) -> torch.Tensor:
        if not key.startswith(hm.MCORE_LAYERS):
            return _narrow(self.reader.get(hm.GLOBAL_RENAMES[key]), offsets, sizes)
        if offsets[0] != self._index:
            self._load_layer(offsets[0])
        name = key[len(hm.MCORE_LAYERS):]
        return _narrow(self._layer[name], offsets[1:], sizes[1:]).reshape(sizes)


def _narrow(full: torch.Tensor, offsets: tuple, sizes: tuple) -> torch.Tensor:
    """The chunk of `full` at `offsets` of size `sizes` (per-layer tensors keep their expert
    axis, so chunk and tensor have the same number of dimensions)."""
    if len(offsets) != full.dim():
        raise RuntimeError(f"chunk {sizes} at {offsets} does not fit a tensor {tuple(full.shape)}")
    return full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
