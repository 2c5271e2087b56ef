"""The student's weights to its rollout engines after an optimizer step, through the disk.

    sync = DiskWeightSync(directory, preset, client)
    cost = sync.sync(model_chunks, step)      # collective: every rank calls it

1. Every rank saves its shards of the model (weights only, no optimizer) as a Megatron-Core
   checkpoint under `directory/mcore` (checkpointing.save_checkpoint: any TP/EP/DP layout).
2. Rank 0 streams it into a Hugging Face directory `directory/hf-step<N>` with the export's
   reader and writer (convert/mcore_reader.export_tensors, convert/safetensors_io), one layer
   in memory at a time, under a temporary name renamed when complete; the previous step's
   directories are removed.
3. Rank 0 asks every engine to load it (`/update_weights_from_disk` with weight_version N) and
   checks the answer (success, and /get_model_info's weight_version N afterwards); every later
   rollout reply must carry version N (sglang_client.parse_generation).
`directory` must be on a file system the engines read (a shared one on a cluster). The cost,
seconds and bytes written, is returned and logged per sync. An error on rank 0 is raised on
every rank (one line naming the engine's URL or the directory).

The NCCL route (SGLang's /init_weights_update_group + /update_weights_from_distributed,
broadcasting each tensor from the trainer's rank 0 into the engines' ranks, as slime's
update_weight_from_distributed.py does) skips the disk; docs/posttraining.md describes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import torch

from megatron_ext.convert.hf_config import hf_config_dict
from megatron_ext.convert.mapping import expected_hf_shapes
from megatron_ext.convert.mcore_reader import McoreCheckpointReader, export_tensors
from megatron_ext.convert.safetensors_io import SafetensorsWriter
from megatron_ext.errors import MarcoError
from megatron_ext.inference.sglang_client import EngineError


class DiskWeightSync:
    def __init__(self, directory: str, preset, client, router_aux_loss_coef: float = 1e-3):
        self.directory = os.path.abspath(directory)
        self.preset, self.client = preset, client
        self.router_aux_loss_coef = router_aux_loss_coef

    def hf_dir(self, step: int) -> str:
        return os.path.join(self.directory, f"hf-step{step}")

    def sync(self, model_chunks, step: int) -> dict:
        import torch.distributed as dist

        from megatron_ext import checkpointing  # Megatron-Core, where a trainer already runs

        t0 = time.perf_counter()
        rank = dist.get_rank() if dist.is_initialized() else 0
        root = os.path.join(self.directory, "mcore")
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(self.directory, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        directory = checkpointing.SaveDirectory(root, overwrite=True)
        ckpt = checkpointing.save_checkpoint(root, checkpointing.TrainState(iteration=step),
                                             model_chunks, directory=directory)
        error, nbytes = None, 0
        if rank == 0:
            try:
                nbytes = self._export(ckpt, step)
                shutil.rmtree(root, ignore_errors=True)
                self.client.update_weights_from_disk(self.hf_dir(step), step)
            except MarcoError as e:
                error = str(e)
        if dist.is_initialized():
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise EngineError(error)
        return {"seconds": time.perf_counter() - t0, "bytes": nbytes}

    def _export(self, ckpt: str, step: int) -> int:
        reader = McoreCheckpointReader(ckpt, self.preset, where="--rollout-sync-dir")
        dtype = reader.dtype
        final = self.hf_dir(step)
        tmp = f"{final}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, "float32")
        config = hf_config_dict(self.preset, name, self.router_aux_loss_coef, {})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        plan = list(expected_hf_shapes(dataclasses.asdict(self.preset), moe=self.preset.is_moe).items())
        writer = SafetensorsWriter(tmp, plan, dtype, 5 * 10**9)
        for tensors in export_tensors(reader):
            writer.add(tensors)
        writer.close()
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for entry in os.listdir(self.directory):  # earlier steps' exports
            if entry.startswith("hf-step") and entry != os.path.basename(final):
                shutil.rmtree(os.path.join(self.directory, entry), ignore_errors=True)
        return int(writer.total_bytes)

