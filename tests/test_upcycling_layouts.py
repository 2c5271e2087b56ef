"""An upcycled checkpoint (written at TP=PP=EP=1) loads at other layouts: EP=2 (with DP=2) and
TP=2 (with sequence parallelism), two gloo processes, same logits as on one rank.

This file is also the worker: `torchrun --nproc-per-node 2 tests/test_upcycling_layouts.py
CKPT REF OUT` loads CKPT at each layout and writes the max logit difference to REF to OUT.
"""

import json
import os
import subprocess
import sys

import torch

LAYOUTS = {"EP=2": dict(expert=2), "TP=2": dict(tensor=2, sequence_parallel=True)}


def test_upcycled_checkpoint_loads_at_ep2_and_tp2(megatron_single_rank, fresh_moe_tracker,
                                                   tmp_path):
    from conftest import REPO, _free_port, subprocess_env
    from helpers_hf import load_upcycle_tool, make_dense_qwen3, megatron_logits, tokens

    from megatron_ext.inference.loading import load_model_from_checkpoint

    hf, out = str(tmp_path / "hf"), str(tmp_path / "moe")
    make_dense_qwen3(hf, seed=3)  # FFN 256, 4 heads / 2 kv heads, vocab 256
    # Drop-Upcycling makes every expert distinct, so a misplaced expert would show.
    assert load_upcycle_tool().main([
        "--hf-dir", hf, "--save", out, "--num-experts", "8", "--moe-ffn-hidden-size", "64",
        "--moe-router-topk", "4", "--drop-ratio", "0.5", "--scale", "marco"]) == 0
    model, _ = load_model_from_checkpoint(out)
    ids = tokens(seq=32)
    torch.save({"ids": ids, "logits": megatron_logits(model, ids)}, tmp_path / "ref.pt")

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), os.path.abspath(__file__), out,
           str(tmp_path / "ref.pt"), str(tmp_path / "gaps.json")]
    run = subprocess.run(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    gaps = json.load(open(tmp_path / "gaps.json"))
    print("logit gaps to one rank:", gaps)
    assert set(gaps) == set(LAYOUTS)
    assert all(gap < 1e-4 for gap in gaps.values()), gaps


def _worker(ckpt: str, ref_path: str, out_path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from megatron_ext import parallel
    from megatron_ext.inference.loading import load_model_from_checkpoint
    from megatron_ext.parallel import ParallelLayout

    ref = torch.load(ref_path)
    gaps = {}
    for i, (name, kw) in enumerate(LAYOUTS.items()):
        layout = ParallelLayout(**kw)
        if i == 0:
            parallel.init_distributed(layout, seed=0)
        else:  # a new layout in the same processes
            parallel_state.destroy_model_parallel()
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=layout.tensor,
                expert_model_parallel_size=layout.expert)
        get_moe_layer_wise_logging_tracker().clear()
        model, _ = load_model_from_checkpoint(ckpt)
        ids = ref["ids"]
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
            # Vocab-parallel output: gather the TP shards of the last dimension.
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        gaps[name] = (logits.float() - ref["logits"]).abs().max().item()
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(gaps, f)
    parallel.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _worker(*sys.argv[1:4])
