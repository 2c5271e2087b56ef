"""The torch._grouped_mm expert backend computes what SequentialMLP computes, from the same
checkpoint (the two layouts are interchangeable through dist_checkpointing)."""

import torch

from megatron_ext import checkpointing
from megatron_ext.inference.loading import load_model_from_checkpoint
from megatron_ext.model import build_model, marco_config
from megatron_ext.presets import get_preset, override


def _batch(seed=0, batch=2, seq=32, vocab=8192):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    return tokens, torch.arange(seq).expand(batch, seq)


def test_grouped_experts_match_sequential(megatron_single_rank, fresh_moe_tracker, tmp_path):
    preset = override(get_preset("tiny"), num_layers=2)
    torch.manual_seed(0)
    sequential = build_model(preset, marco_config(preset), "sequential")
    checkpointing.save_checkpoint(
        str(tmp_path), checkpointing.TrainState(), [sequential],
        model_info=checkpointing.model_info(preset),
    )
    grouped, _ = load_model_from_checkpoint(str(tmp_path), expert_backend="torch-grouped")
    assert any("weight1" in n for n, _ in grouped.named_parameters())

    tokens, positions = _batch()
    logits_seq = sequential(tokens, positions, None)
    logits_grp = grouped(tokens, positions, None)
    assert (logits_seq - logits_grp).abs().max().item() < 1e-4

    # Same gradients too: compare the router weight gradient of layer 0.
    logits_seq.float().pow(2).mean().backward()
    logits_grp.float().pow(2).mean().backward()
    g_seq = sequential.decoder.layers[0].mlp.router.weight.grad
    g_grp = grouped.decoder.layers[0].mlp.router.weight.grad
    assert torch.allclose(g_seq, g_grp, atol=1e-5, rtol=1e-4)
    # And an expert weight: expert 3's down projection.
    w2_grad = grouped.decoder.layers[0].mlp.experts.weight2.grad.view(16, 128, 128)[3]
    seq_grad = sequential.decoder.layers[0].mlp.experts.local_experts[3].linear_fc2.weight.grad
    assert torch.allclose(w2_grad, seq_grad.t(), atol=1e-5, rtol=1e-4)


def test_grouped_experts_with_no_tokens_in_bf16(megatron_single_rank):
    """An expert-parallel rank whose experts get no token (fp32 routing probabilities, bf16
    weights): the zero-size branch keeps every weight in the graph and matches dtypes."""
    from megatron_ext.config import ModelOptions
    from megatron_ext.experts import TorchGroupedMLP
    from megatron_ext.parallel import ParallelLayout

    preset = override(get_preset("tiny"), num_layers=1)
    config = marco_config(preset, ParallelLayout(), ModelOptions(params_dtype=torch.bfloat16,
                                                                 expert_backend="torch-grouped"))
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["ep", "expt_tp", "expt_dp"])
    experts = TorchGroupedMLP(4, config, pgs)
    x = torch.zeros(0, preset.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    out, _ = experts(x, torch.zeros(4, dtype=torch.long), torch.zeros(0, dtype=torch.float32))
    assert out.dtype == torch.bfloat16 and out.shape == (0, preset.hidden_size)
    out.sum().backward()
    assert experts.weight1.grad is not None and experts.weight2.grad is not None
