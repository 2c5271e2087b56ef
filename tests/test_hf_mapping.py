"""megatron_ext/convert: the HF <-> Megatron weight mapping (layout helpers, lossless round
trips), a qwen3_moe model converted to Megatron computing the same logits as in transformers,
the streaming writer against Megatron's own save, and HF config errors."""

import os

import pytest
import torch
from helpers_hf import hf_logits, make_dense_qwen3, make_moe_qwen3, megatron_logits, tokens
from safetensors import safe_open

from megatron_ext.convert import mapping as hm
from megatron_ext.convert.hf_config import preset_fields_from_hf_config, read_hf_config
from megatron_ext.errors import ConversionError

LAYOUT = hm.AttentionLayout(num_heads=4, num_query_groups=2, head_dim=3)


def test_interleave_qkv_orders_rows_per_query_group():
    hidden = 5
    # Row r of q is filled with 100 + r, of k with 200 + r, of v with 300 + r.
    q = (100 + torch.arange(12.0))[:, None].expand(12, hidden)
    k = (200 + torch.arange(6.0))[:, None].expand(6, hidden)
    v = (300 + torch.arange(6.0))[:, None].expand(6, hidden)
    qkv = hm.interleave_qkv(q, k, v, LAYOUT)
    # group 0: q heads 0,1 (rows 0-5), k_0 (rows 0-2), v_0; group 1: q heads 2,3, k_1, v_1.
    expected = [*range(100, 106), 200, 201, 202, 300, 301, 302,
                *range(106, 112), 203, 204, 205, 303, 304, 305]
    assert qkv[:, 0].tolist() == expected
    assert all(torch.equal(a, b) for a, b in zip(hm.split_qkv(qkv, LAYOUT), (q, k, v)))


def test_gate_up_concat_is_gate_first():
    gate, up = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    fc1 = hm.concat_gate_up(gate, up)
    assert fc1.shape == (2, 8, 3) and torch.equal(fc1[:, :4], gate)
    assert all(torch.equal(a, b) for a, b in zip(hm.split_gate_up(fc1), (gate, up)))


def _file_tensors(directory):
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_qwen3_moe_round_trip_is_bit_identical(tmp_path):
    model = make_moe_qwen3(str(tmp_path))
    on_disk = _file_tensors(str(tmp_path))  # per-expert names, as save_pretrained writes
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in on_disk
    in_memory = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert "model.layers.0.mlp.experts.gate_up_proj" in in_memory  # transformers 5: fused
    layout = hm.AttentionLayout(4, 2, 16)
    mc = hm.hf_to_mcore(on_disk, layout, num_layers=2, moe=True)
    assert mc[hm.MCORE_LAYERS + hm.EXPERT_FC1].shape == (2, 8, 64, 64)  # (L, E, 2F, H)
    assert mc[hm.MCORE_LAYERS + hm.EXPERT_FC2].shape == (2, 8, 64, 32)
    for source, fused in ((on_disk, False), (in_memory, True)):
        mc = hm.hf_to_mcore(source, layout, num_layers=2, moe=True)
        back = hm.mcore_to_hf(mc, layout, fused_experts=fused)
        assert back.keys() == source.keys()
        assert all(torch.equal(back[k], source[k]) for k in source)
    # The fused (in-memory) and per-expert (file) forms are the same weights.
    a = hm.hf_to_mcore(on_disk, layout, 2, moe=True)
    b = hm.hf_to_mcore(in_memory, layout, 2, moe=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_qwen3_dense_round_trip_and_shapes(tmp_path):
    make_dense_qwen3(str(tmp_path), tie_word_embeddings=False)
    sd = _file_tensors(str(tmp_path))
    fields = preset_fields_from_hf_config(read_hf_config(str(tmp_path)))
    assert fields["rotary_base"] == 1e6 and not fields["tie_embeddings"]
    assert {k: tuple(v.shape) for k, v in sd.items()} == hm.expected_hf_shapes(fields)
    layout = hm.AttentionLayout(4, 2, 16)
    mc = hm.hf_to_mcore(sd, layout, num_layers=2, moe=False, tied=False)
    assert mc["decoder.layers.mlp.linear_fc1.weight"].shape == (2, 512, 64)
    assert "output_layer.weight" in mc
    back = hm.mcore_to_hf(mc, layout)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def _global_chunk(tensors):
    def produce(key, offsets, sizes):
        index = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
        return tensors[key][index].clone()
    return produce


def test_qwen3_moe_logits_match_in_megatron(megatron_single_rank, fresh_moe_tracker, tmp_path):
    """HF qwen3_moe -> Megatron keys -> checkpoint -> Megatron model: same logits (fp32)."""
    from megatron_ext import checkpointing
    from megatron_ext.convert.streaming import save_streaming
    from megatron_ext.inference.loading import load_model_from_checkpoint
    from megatron_ext.presets import ModelPreset

    hf = make_moe_qwen3()
    fields = preset_fields_from_hf_config(hf.config.to_dict())
    preset = ModelPreset(name="moe-test", description="", **fields)
    layout = hm.AttentionLayout.from_preset(preset)
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    mc = hm.hf_to_mcore(sd, layout, preset.num_layers, moe=True)
    root = str(tmp_path / "ckpt")
    save_streaming(root, preset, _global_chunk(mc), torch.float32, checkpointing.model_info(preset))
    model, _ = load_model_from_checkpoint(root)
    ids = tokens()
    gap = (megatron_logits(model, ids) - hf_logits(hf, ids)).abs().max().item()
    assert gap < 1e-4, gap


def test_config_errors(tmp_path):
    with pytest.raises(ConversionError, match="no such directory"):
        read_hf_config(str(tmp_path / "nope"))
    with pytest.raises(ConversionError, match="not a Qwen3"):
        preset_fields_from_hf_config({"model_type": "llama"})


def test_streaming_writer_matches_megatron_save(megatron_single_rank, fresh_moe_tracker, tmp_path):
    """The streaming writer's checkpoint has the keys, shapes and chunks of Megatron's own save
    of the same model, and loads back to the same weights."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_ext import checkpointing
    from megatron_ext.convert.streaming import save_streaming
    from megatron_ext.inference.loading import load_model_from_checkpoint
    from megatron_ext.model import build_model, marco_config
    from megatron_ext.presets import get_preset, override

    preset = override(get_preset("tiny"), num_layers=2)
    torch.manual_seed(0)
    model = build_model(preset, marco_config(preset), "sequential")
    full = {}  # every checkpoint tensor, assembled from the model's shards
    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor):
            t = full.setdefault(sh.key, torch.zeros(sh.global_shape))
            sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
            index = tuple(slice(o, o + s) for o, s in zip(sh.global_offset, sizes))
            t[index] = sh.data.reshape(sizes)
    ours, theirs = str(tmp_path / "streamed"), str(tmp_path / "megatron")
    info = checkpointing.model_info(preset)
    save_streaming(ours, preset, _global_chunk(full), torch.float32, info)
    checkpointing.save_checkpoint(theirs, checkpointing.TrainState(), [model],
                                  model_info=checkpointing.model_info(preset))

    def tensors(root):
        md = FileSystemReader(os.path.join(root, "iter_0000000")).read_metadata()
        return {k: (tuple(v.size), v.properties.dtype,
                    sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks))
                for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks")}
    assert tensors(ours) == tensors(theirs)
    loaded, _ = load_model_from_checkpoint(ours)
    reference = model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items()
               if isinstance(v, torch.Tensor))
