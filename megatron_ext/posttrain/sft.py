"""Supervised fine-tuning as a trainer task: chat data (sft_data.py), assistant-token loss.

The loop, optimizer, checkpoints, metrics and parallel layouts are the pre-training trainer's
(megatron_ext/trainer.py); only the data differs. SFT batches carry a `loss_mask` over
assistant tokens (each assistant turn's content and its <|im_end|>) and, when conversations
are packed, either a block-diagonal `attention_mask` (the non-TE attention path: SDPA with a
boolean mask) or `cu_seqlens`, from which the TransformerEngine path builds THD
`PackedSeqParams` (its fused attention then keeps attention inside each conversation without
an s x s mask).

Loading: a checkpoint that is not an SFT run (a pre-trained, upcycled or imported model) gives
its weights only: fresh optimizer, schedule and RNG, iteration 0 (Megatron-LM's --finetune).
An SFT checkpoint resumes exactly.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ext import trainer as trainer_module
from megatron_ext.layer_spec import te_usable
from megatron_ext.posttrain.sft_data import build_sft_data
from megatron_ext.task import Task

log = logging.getLogger(__name__)


def _packed_seq_params(batch: dict):
    """THD PackedSeqParams for TE's attention: the micro-batch's rows are one flat sequence
    whose conversations (and the trailing padding) are the segments of `cu_seqlens`."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch["cu_seqlens"].to(torch.int32).flatten()
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def sft_forward_step(data_iterator, model):
    """Assistant-token cross-entropy of one (possibly packed) micro-batch."""
    batch = trainer_module.to_device(next(data_iterator))
    if "cu_seqlens" in batch and "attention_mask" not in batch:
        # TE path: [b, s] -> one [1, b*s] THD sequence.
        flat = {k: batch[k].reshape(1, -1) for k in ("tokens", "position_ids", "labels", "loss_mask")}
        output = model(flat["tokens"], flat["position_ids"], None, labels=flat["labels"],
                       packed_seq_params=_packed_seq_params(batch))
        return output, partial(trainer_module.lm_loss_func, flat["loss_mask"])
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"])
    return output, partial(trainer_module.lm_loss_func, batch["loss_mask"])


class SFTTask(Task):
    """`posttrain_marco.py sft`: the trainer's task for supervised fine-tuning."""

    kind = "sft"
    forward_step = staticmethod(sft_forward_step)

    def build_data(self, trainer):
        cfg = trainer.cfg
        data = build_sft_data(
            cfg.data, trainer.tokenizer, global_batch_size=cfg.batch.global_batch_size,
            seq_length=cfg.batch.seq_length, train_iters=cfg.batch.train_iters,
            seed=cfg.batch.seed,
            # TE's fused attention takes cu_seqlens; the dense s x s mask is for SDPA only.
            attention_mask=not te_usable())
        for line in data.summary():
            log.info(line)
        return data

def assistant_loss(model_chunks, data, dp_rank: int, dp_size: int, micro_batch_size: int) -> dict:
    """{"validation/lm_loss/<set>": assistant-token loss} of every validation set of SFT data
    (each held-out conversation once), summed over data-parallel ranks."""
    out = {}
    model = model_chunks[0] if isinstance(model_chunks, (list, tuple)) else model_chunks
    was_training = model.training
    model.eval()
    try:
        for name in data.validation_names():
            count = max(1, -(-data.validation_rows(name) // (micro_batch_size * dp_size)))
            total = torch.zeros(2, device=trainer_module.run_device())
            with torch.no_grad():
                for batch in data.validation_micro_batches(name, count, dp_rank, dp_size,
                                                           micro_batch_size):
                    output, loss_func = sft_forward_step(iter([batch]), model)
                    total += loss_func(output)[2]["lm loss"].to(total.device).float()
            if dist.is_initialized() and dp_size > 1:
                dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
            out[f"validation/lm_loss/{name}"] = (total[0] / total[1].clamp(min=1)).item()
    finally:
        model.train(was_training)
    return out
