"""Reading a Megatron-Core torch_dist checkpoint a chunk at a time (the export's input).

  McoreCheckpointReader   one layer (or the embedding / final norm) of a checkpoint saved at
                          any TP/PP/EP/DP layout: a DCP load of just that chunk of each global
                          tensor (DCP reshards from the saved chunks). Up front: the files
                          (`checkpointing.verify_checkpoint`: `.metadata`, every `.distcp` as
                          long as indexed, `common.pt`) and every tensor's name and global shape
                          against the architecture. When read: non-finite values (NaN/inf) are
                          refused unless told otherwise.
                          A file damaged inside fails when read: one line naming the
                          checkpoint and its data files (torch's `CheckpointException` derives
                          from BaseException, so `except Exception` never sees it).
  export_tensors          the checkpoint as HF tensors (mapping.py), layer by layer.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_ext.convert import mapping as hm
from megatron_ext.errors import CheckpointError, ConversionError


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

    Checks up front that the checkpoint's files are intact and that every tensor the
    architecture needs is there with its global shape (`where` names the flag in error
    messages). Tensors with NaN/inf values are refused when read, unless `allow_non_finite`."""

    def __init__(self, ckpt_dir: str, preset, where: str = "--load", allow_non_finite: bool = False):
        from megatron_ext import checkpointing  # imports Megatron (seconds)

        self.ckpt_dir, self.preset, self.where = ckpt_dir, preset, where
        self.allow_non_finite = allow_non_finite
        checkpointing.verify_checkpoint(ckpt_dir, where)
        try:
            md = dcp.FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - not a torch_dist index
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
        try:
            dcp.load({}, storage_reader=dcp.FileSystemReader(self.ckpt_dir),
                     planner=_ChunkLoadPlanner(bufs), no_dist=True)
        except CheckpointException as e:  # a BaseException: `except Exception` misses it
            raise self._damaged(e) from None
        return {k: buf for k, (_, buf) in bufs.items()}

    def _damaged(self, e: CheckpointException) -> CheckpointError:
        """A failed read of files that passed the up-front checks (damaged inside): one line
        naming the checkpoint, its data files and the first rank's error (without torch's
        advice, which is about trusting pickles, not about this)."""
        failures = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        cause = failures[0] if failures else e
        text = (str(cause).strip().splitlines() or [""])[0].split(". ")[0]
        files = sorted(n for n in os.listdir(self.ckpt_dir) if n.endswith(".distcp"))
        return CheckpointError(f"{self.where} {self.ckpt_dir}: reading {', '.join(files)} failed "
                               f"({type(cause).__name__}: {text}); the checkpoint is corrupt")

    def _check_finite(self, tensors: dict, layer: int | None = None) -> None:
        if self.allow_non_finite:
            return
        for key, t in tensors.items():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                at = f" (layer {layer})" if layer is not None else ""
                raise ConversionError(
                    f"{self.where} {self.ckpt_dir}: tensor {key}{at} holds {bad} non-finite "
                    f"value(s) (NaN/inf) of {t.numel()}; not a usable model "
                    "(--allow-non-finite exports it anyway)")

    def layer(self, i: int) -> dict:
        """Layer i's tensors by Megatron per-layer name (layer axis removed)."""
        requests = {hm.MCORE_LAYERS + n: ((i,) + (0,) * len(s), (1, *s))
                    for n, s in self.layer_shapes.items()}
        out = self._read(requests)
        self._check_finite(out, layer=i)
        return {k[len(hm.MCORE_LAYERS):]: v[0] for k, v in out.items()}

    def globals(self) -> dict:
        """Embedding, final norm (and untied output layer) by Megatron name."""
        out = self._read({k: ((0,) * len(s), s) for k, s in self.global_shapes.items()})
        self._check_finite(out)
        return out


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
