"""Write a Megatron-Core checkpoint chunk by chunk, never holding the whole model.

Used to make checkpoints from other formats (upcycled dense HF models: 8B parameters for nano)
on a machine with little memory. The target model is built on the meta device at
TP = PP = EP = 1; its `sharded_state_dict()` gives the exact keys, global shapes and chunks
Megatron itself writes at that layout. `dist_checkpointing.save` then runs as usual
(validation, common.pt, metadata.json) with a torch_dist save strategy whose DCP planner asks
a *producer* for each chunk when the writer reaches it: `produce(key, global_offsets, sizes)`
returns that chunk of the global tensor. A single writer thread, items sorted layer-major and
expert-minor, so producers can cache one layer and about one chunk is alive at a time.

Megatron's own torch_dist writer resolves every item up front (for async saves), which would
materialise the model; this one keeps its file format, so `dist_checkpointing.load` reads the
result at any TP/PP/EP layout like any other checkpoint.

Producers: `HFCheckpointSource` below (a `qwen3` / `qwen3_moe` HF directory, for the import)
and `upcycling.UpcycledCheckpoint` (a dense HF model made into a MoE).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, is_main_replica
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megatron_ext import checkpointing
from megatron_ext.convert import mapping as hm
from megatron_ext.convert.safetensors_io import HFSafetensors
from megatron_ext.model import build_meta_model
from megatron_ext.presets import ModelPreset

Producer = Callable[[str, tuple, tuple], torch.Tensor]


def write_order(fqn: str, offsets: tuple) -> tuple:
    """Embedding first, then layer by layer (expert by expert inside a layer), then the rest."""
    if not offsets:  # serialized objects (extra state): no tensor data to produce
        return (-1, 0, 0)
    if fqn.startswith(hm.MCORE_LAYERS):
        return (1, offsets[0], offsets[1] if ".experts." in fqn else -1)
    return (0 if fqn.startswith("embedding.") else 2, 0, 0)


class _Chunks:
    """The chunks of one checkpoint tensor, as Megatron's ShardedTensors describe them, in
    DCP's checkpointable protocol; the data comes from the producer when written.

    (Megatron's own conversion builds torch ShardedTensors, whose construction checks every
    pair of chunks for overlap: 13k chunks for nano's fc1, minutes of CPU.)
    """

    def __init__(self, sh_tens: list):
        first = sh_tens[0]
        self.size = torch.Size(first.global_shape)
        self.properties = TensorProperties(dtype=first.dtype)
        self.chunks = []
        for sh in sh_tens:
            assert sh.flattened_range is None, sh.key
            # Prepended axes (layer, expert) are global-only: one index of each per chunk.
            sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
            self.chunks.append(ChunkStorageMetadata(torch.Size(sh.global_offset),
                                                    torch.Size(sizes)))

    def __create_write_items__(self, fqn: str, obj) -> list:
        return [
            WriteItem(index=MetadataIndex(fqn, c.offsets, i), type=WriteItemType.SHARD,
                      tensor_data=TensorWriteData(chunk=c, properties=self.properties,
                                                  size=self.size))
            for i, c in enumerate(self.chunks)
        ]

    def __create_chunk_list__(self) -> list:
        return list(self.chunks)

    def __get_tensor_shard__(self, index):
        raise NotImplementedError("chunks are produced by the planner")


class _ProducingPlanner(MCoreSavePlanner):
    def __init__(self, produce: Producer):
        super().__init__(flatten_state_dict=False)
        self._produce = produce

    def create_local_plan(self):
        plan = super().create_local_plan()
        # The writer keeps plan order with one thread; sorting is stable.
        items = sorted(plan.items,
                       key=lambda w: write_order(w.index.fqn, tuple(w.index.offset or ())))
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def create_global_plan(self, all_plans):
        # One writer, and dist_checkpointing.save has already checked (validate_sharding_
        # integrity) that the chunks cover each tensor exactly once: skip DCP's own check,
        # quadratic in the chunks of a tensor.
        plans, metadata = create_default_global_save_plan(all_plans)
        self.global_plan, self.metadata = plans, metadata
        return plans, metadata

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        sizes = tuple(write_item.tensor_data.chunk.sizes)
        data = self._produce(write_item.index.fqn, tuple(write_item.index.offset), sizes)
        if tuple(data.shape) != sizes:
            raise RuntimeError(f"producer gave {tuple(data.shape)} for {write_item.index.fqn} "
                               f"chunk {sizes}")
        return data.to(write_item.tensor_data.properties.dtype).contiguous()


class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist backend, version 1 (what the default loader expects), produced lazily."""

    def __init__(self, produce: Producer):
        super().__init__("torch_dist", 1, thread_count=1)
        self.produce = produce

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        tensors, objects = defaultdict(list), defaultdict(list)  # by key, main replicas only
        for sh in nested_values(sharded_state_dict):
            if is_main_replica(sh.replica_id):
                if isinstance(sh, ShardedObject):
                    objects[sh.unique_key].append(sh)
                else:
                    tensors[sh.key].append(sh)
        # Objects (extra state) serialised exactly as Megatron's writer does.
        state = mcore_to_pyt_state_dict(dict(objects), is_loading=False)
        state.update({key: _Chunks(shards) for key, shards in tensors.items()})
        writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True,
                                      thread_count=1, per_thread_copy_ahead=0)
        try:
            dcp.save(state, storage_writer=writer, planner=_ProducingPlanner(self.produce))
        except CheckpointException as e:
            # A BaseException wrapping (exception, stack) per rank: surface the real error.
            failures = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
            if len(failures) == 1 and isinstance(failures[0], Exception):
                raise failures[0] from None
            raise


def save_streaming(root: str, preset: ModelPreset, produce: Producer, dtype: torch.dtype,
                   model_info: dict, common: Optional[dict] = None) -> str:
    """Write `<root>/iter_0000000` (model weights only) and the 'latest' marker.

    `root` should be a fresh directory (callers write to a temporary one and rename it).
    Common state as `checkpointing.save_checkpoint` writes it, without optimizer; world_size
    is None because there is no per-rank (RNG) state to restore.
    """

    ckpt = checkpointing.iteration_dir(root, 0)
    os.makedirs(ckpt)
    sharded = {
        "model": build_meta_model(preset, dtype).sharded_state_dict(),
        "train_state": dataclasses.asdict(checkpointing.TrainState()),
        "checkpoint_version": checkpointing.CHECKPOINT_VERSION,
        "world_size": None,
        "has_optimizer": False,
        **(common or {}),
    }
    dist_checkpointing.save(sharded, ckpt, sharded_strategy=StreamingSaveStrategy(produce))
    with open(os.path.join(ckpt, checkpointing.MODEL_FILE), "w") as f:
        json.dump(model_info, f, indent=2)
    with open(os.path.join(root, checkpointing.LATEST_FILE), "w") as f:
        f.write("0")
    return ckpt


class HFCheckpointSource:
    """Chunks of the Megatron checkpoint of a `qwen3` / `qwen3_moe` HF directory; one HF layer
    is read and converted at a time (the writer goes layer by layer)."""

    def __init__(self, reader: HFSafetensors, preset, on_layer=None):
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
            return hm.chunk_of(self.reader.get(hm.GLOBAL_RENAMES[key]), offsets, sizes)
        if offsets[0] != self._index:
            self._load_layer(offsets[0])
        name = key[len(hm.MCORE_LAYERS):]
        return hm.chunk_of(self._layer[name], offsets, sizes)
