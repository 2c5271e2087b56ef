"""Expert-routing analysis: a planted routing is recovered exactly, through the router hooks,
the checkpoint and the CLI; EP=2 checkpoints give the same signatures; bad input is named."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, load_tool, run_pretrain, subprocess_env

from megatron_ext import routing_analysis
from megatron_ext.presets import get_preset, override


def test_planted_counts_are_recovered_exactly():
    layers, experts = 3, 8
    base = np.zeros((layers, experts))
    ab, c = base.copy(), base.copy()
    ab[:, :4] = [40, 30, 20, 10]
    c[:, 4:] = [10, 10, 10, 10]
    counts = {"A": ab, "B": 2 * ab, "C": c}
    result = routing_analysis.analyse(counts, {"A": 25, "B": 50, "C": 10}, [0, 1, 2])
    assert np.allclose(result.signatures[0], ab / 100) and np.allclose(result.signatures[1], ab / 100)
    assert np.allclose(result.signatures.sum(axis=2), 1.0)
    assert result.correlation[0, 1] == pytest.approx(1.0)
    assert result.correlation[0, 2] < 0
    assert routing_analysis.clusters(result, 2) == [{"A", "B"}, {"C"}]
    assert result.unused_experts == {0: [], 1: [], 2: []}
    # Entropy of shares (0.4, 0.3, 0.2, 0.1) and of four equal shares (2 bits).
    expected_ab = -sum(p * np.log2(p) for p in (0.4, 0.3, 0.2, 0.1))
    assert result.entropy[0] == pytest.approx([expected_ab] * 3)
    assert result.entropy[2] == pytest.approx([2.0] * 3)


def _planted_model_checkpoint(path, megatron):
    """A 2-layer tiny MoE whose routers send tokens 0-99 to experts 0-3 and 100-199 to 8-11.

    Attention and expert outputs are zeroed, so every layer's router sees the embedding."""
    from megatron_ext import checkpointing
    from megatron_ext.model import build_model, marco_config

    preset = override(get_preset("tiny"), num_layers=2)
    model = build_model(preset, marco_config(preset), "sequential")
    hidden = preset.hidden_size
    g = torch.Generator().manual_seed(0)
    u, v = torch.zeros(hidden), torch.zeros(hidden)
    u[: hidden // 2], v[hidden // 2 :] = 1.0, 1.0
    with torch.no_grad():
        emb = model.embedding.word_embeddings.weight
        emb.normal_(0, 0.01, generator=g)
        emb[:100] += u
        emb[100:200] += v
        for layer in model.decoder.layers:
            layer.self_attention.linear_proj.weight.zero_()
            router = layer.mlp.router.weight
            router.zero_()
            router[0:4] = 10 * u
            router[8:12] = 10 * v
            for expert in layer.mlp.experts.local_experts:
                expert.linear_fc2.weight.zero_()
    checkpointing.save_checkpoint(
        str(path), checkpointing.TrainState(), [model], model_info=checkpointing.model_info(preset)
    )
    return preset


def _indexed_dataset(prefix, token_range, seed):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(8):
        builder.add_item(torch.from_numpy(rng.integers(*token_range, size=300).astype(np.int64)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


ANALYZE = load_tool("analyze_routing")


def _analyze(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "analyze_routing.py"), *args],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, megatron_single_rank):
    root = tmp_path_factory.mktemp("planted")
    _planted_model_checkpoint(root / "ckpt", megatron_single_rank)
    corpus = []
    for lang, token_range, seed in (("aa", (0, 50), 1), ("bb", (50, 100), 2), ("cc", (100, 200), 3)):
        _indexed_dataset(root / lang, token_range, seed)
        corpus.append(f"{lang}={root / lang}")
    return root, corpus


@pytest.mark.slow
def test_planted_routing_through_hooks_and_cli(planted):
    root, corpus = planted
    out = root / "analysis"
    result = _analyze("--load", str(root / "ckpt"), "--out", str(out), "--corpus", *corpus,
                      "--max-tokens-per-language", "1024", "--seq-length", "128")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {"signatures.npz", "signatures.csv", "correlation.csv", "clustering.json",
                "correlation_heatmap.png", "entropy.csv", "unused_experts.json", "summary.json"}
    assert expected <= {p.name for p in out.iterdir()}
    data = np.load(out / "signatures.npz")
    assert list(data["languages"]) == ["aa", "bb", "cc"]
    sig = data["signatures"]  # [languages, layers, experts]
    assert np.allclose(sig[0, :, 0:4], 0.25) and np.allclose(sig[1, :, 0:4], 0.25)
    assert np.allclose(sig[2, :, 8:12], 0.25)
    assert np.allclose(data["counts"].sum(axis=2), 4 * 1024)  # top-4: each token counted 4 times
    assert data["correlation"][0, 1] == pytest.approx(1.0)
    assert data["correlation"][0, 2] < 0
    clustering = json.loads((out / "clustering.json").read_text())
    assert clustering["leaf_order"].index("cc") in (0, 2)  # cc is not between aa and bb
    unused = json.loads((out / "unused_experts.json").read_text())
    assert unused == {"0": [4, 5, 6, 7, 12, 13, 14, 15], "1": [4, 5, 6, 7, 12, 13, 14, 15]}
    import matplotlib.image

    assert matplotlib.image.imread(out / "correlation_heatmap.png").shape[2] in (3, 4)


@pytest.mark.slow
def test_expert_parallel_checkpoint_gives_identical_signatures(planted, tmp_path):
    root, corpus = planted
    ep2 = tmp_path / "ep2"
    # Reshard the planted weights to EP=2 by a zero-learning-rate step saved from 2 ranks.
    result = run_pretrain("--preset", "tiny", "--num-layers", "2", "--mock-data", "--load",
                          str(root / "ckpt"), "--save", str(ep2), "--train-iters", "1",
                          "--lr", "0", "--min-lr", "0", "--weight-decay", "0",
                          "--expert-model-parallel-size", "2", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    outs = {}
    for name, ckpt in (("ep1", root / "ckpt"), ("ep2", ep2)):
        outs[name] = tmp_path / f"analysis_{name}"
        done = _analyze("--load", str(ckpt), "--out", str(outs[name]), "--corpus", *corpus,
                        "--max-tokens-per-language", "512", "--seq-length", "128")
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = (np.load(outs[n] / "signatures.npz") for n in ("ep1", "ep2"))
    assert np.array_equal(a["counts"], b["counts"])
    assert np.array_equal(a["signatures"], b["signatures"])


@pytest.mark.parametrize("case", ["dense", "empty_language", "bad_layer"])
def test_bad_input_is_one_line(case, planted, tmp_path, megatron_single_rank, capsys):
    root, corpus = planted
    args = ["--load", str(root / "ckpt"), "--out", str(tmp_path / "out"), "--corpus", *corpus]
    message = None
    if case == "dense":
        from megatron_ext import checkpointing
        from megatron_ext.model import build_model, marco_config

        dense = get_preset("tiny-dense")
        checkpointing.save_checkpoint(str(tmp_path / "dense"), checkpointing.TrainState(),
                                      [build_model(dense, marco_config(dense), "sequential")],
                                      model_info=checkpointing.model_info(dense))
        args[1] = str(tmp_path / "dense")
        message = "dense checkpoint has no routers"
    elif case == "empty_language":
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        builder = IndexedDatasetBuilder(str(tmp_path / "empty.bin"), dtype=np.uint16)
        builder.finalize(str(tmp_path / "empty.idx"))
        args += [f"zz={tmp_path / 'empty'}"]
        message = "--corpus zz: " + str(tmp_path / "empty") + " holds no documents"
    else:
        args += ["--layers", "0,7"]
        message = "--layers 0,7: unknown layer index 7"
    # The tool in this process (its start-up is what the CLI tests above cover): status 2 and
    # one line, before anything is written.
    assert ANALYZE.main(args) == 2
    err = capsys.readouterr().err
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert not (tmp_path / "out").exists()
