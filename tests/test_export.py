"""Megatron <-> Hugging Face: tools/export_mcore_to_hf.py and tools/import_hf_to_mcore.py.

Exports load in `transformers.AutoModelForCausalLM` with the Megatron model's logits (fp32,
within 1e-4), including trainer checkpoints saved with DP=2 and with EP=2; a qwen3_moe made by
transformers survives HF -> Megatron -> HF bit for bit; the SentencePiece tokenizer exports to
the same ids; bad input, damaged checkpoints (also given to the routing analysis) and non-finite
weights are one `error:` line and leave nothing behind.
"""

import gzip
import json
import os

import pytest
import torch
from conftest import REPO, load_tool, run_pretrain
from helpers_hf import hf_logits, make_dense_qwen3, make_moe_qwen3, megatron_logits, tokens
from safetensors import safe_open

EXPORT, IMPORT = load_tool("export_mcore_to_hf"), load_tool("import_hf_to_mcore")


def hf_tensors(directory) -> dict:
    """Every tensor of an HF directory (one file or shards), by name."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    out = {}
    for name in names:
        with safe_open(os.path.join(directory, name), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def load_hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def logit_gap(ckpt, hf_dir, vocab, seq=48) -> float:
    from megatron_ext.inference.loading import load_model_from_checkpoint

    model, _ = load_model_from_checkpoint(ckpt)
    ids = tokens(seq=seq, vocab=vocab, seed=1)
    return (megatron_logits(model.eval(), ids) - hf_logits(load_hf(hf_dir), ids)).abs().max().item()


# ------------------------------------------------------------------------------------------
def test_qwen3_moe_hf_to_megatron_to_hf_is_bit_identical(megatron_single_rank, fresh_moe_tracker,
                                                         tmp_path):
    src, ckpt, back = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "back"
    original = make_moe_qwen3(str(src), seed=5)  # 8 experts x 32, top-2, per-expert files
    assert IMPORT.main(["--hf-dir", str(src), "--save", str(ckpt)]) == 0
    # The imported checkpoint computes what transformers computes.
    from megatron_ext.inference.loading import load_model_from_checkpoint

    model, preset = load_model_from_checkpoint(str(ckpt))
    ids = tokens(seq=32)
    gap_import = (megatron_logits(model, ids) - hf_logits(original, ids)).abs().max().item()
    assert gap_import < 1e-4, gap_import
    assert EXPORT.main(["--load", str(ckpt), "--out", str(back)]) == 0
    a, b = hf_tensors(src), hf_tensors(back)
    assert a.keys() == b.keys() and len(a) == 2 * (1 + 8 * 3 + 8) + 2  # no lm_head: tied
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    src_cfg, back_cfg = (json.load(open(d / "config.json")) for d in (src, back))
    for key in ("model_type", "hidden_size", "intermediate_size", "moe_intermediate_size",
                "num_experts_per_tok", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "norm_topk_prob", "decoder_sparse_step", "vocab_size"):
        assert src_cfg[key] == back_cfg[key], key
    assert back_cfg["num_experts"] == src_cfg["num_local_experts"] == 8  # transformers 5's name
    print(f"qwen3_moe import: logits max abs diff {gap_import:.2e}; round trip bit-identical")


def test_bf16_sharded_round_trip_and_fp32_to_bf16_export(megatron_single_rank, fresh_moe_tracker,
                                                        tmp_path):
    src, ckpt, back = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "back"
    make_moe_qwen3(seed=6).to(torch.bfloat16).save_pretrained(str(src), max_shard_size="200KB")
    assert os.path.isfile(src / "model.safetensors.index.json")
    assert IMPORT.main(["--hf-dir", str(src), "--save", str(ckpt)]) == 0
    assert EXPORT.main(["--load", str(ckpt), "--out", str(back), "--max-shard-size", "100KB"]) == 0
    index = json.load(open(back / "model.safetensors.index.json"))
    files = set(index["weight_map"].values())
    assert len(files) > 2 and files == {n for n in os.listdir(back) if n.endswith(".safetensors")}
    a, b = hf_tensors(src), hf_tensors(back)
    assert a.keys() == b.keys() == index["weight_map"].keys()
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in b.values())
    assert json.load(open(back / "config.json"))["torch_dtype"] == "bfloat16"

    # An fp32 checkpoint exported as bf16: the same weights, rounded.
    fp32_src, fp32_ckpt, bf16_out = tmp_path / "hf32", tmp_path / "ckpt32", tmp_path / "bf16"
    make_dense_qwen3(str(fp32_src), seed=2)
    assert IMPORT.main(["--hf-dir", str(fp32_src), "--save", str(fp32_ckpt)]) == 0
    assert EXPORT.main(["--load", str(fp32_ckpt), "--out", str(bf16_out), "--dtype", "bf16"]) == 0
    a, b = hf_tensors(fp32_src), hf_tensors(bf16_out)
    assert all(torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a)


def test_sentencepiece_tokenizer_exports_to_the_same_ids(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from megatron_ext.convert.tokenizer_export import sentencepiece_to_hf

    model = REPO / "data" / "tokenizer" / "marco_tiny_spm.model"
    files = sentencepiece_to_hf(str(model), str(tmp_path))
    assert files == ["tokenizer.json", "tokenizer_config.json"]
    hf, sp = AutoTokenizer.from_pretrained(str(tmp_path)), spm.SentencePieceProcessor(model_file=str(model))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)) == (1, 2, 3, 8192)
    docs = 0
    for path in sorted((REPO / "data" / "corpus").glob("*.valid.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                ids = hf(text, add_special_tokens=False).input_ids
                assert ids == sp.encode(text), path  # no BOS, no dummy prefix: training ids
                assert hf.decode(ids) == text
                docs += 1
    assert docs > 100
    assert hf("x y\n").input_ids == sp.encode("x y\n")  # add_special_tokens default adds nothing


def _leftovers(parent):
    return sorted(n for n in os.listdir(parent))


def assert_fails(capsys, argv, match, parent):
    before = _leftovers(parent)
    assert EXPORT.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert _leftovers(parent) == before  # nothing written, not even a temporary directory


def test_bad_input(megatron_single_rank, fresh_moe_tracker, capsys, tmp_path):
    from megatron_ext import checkpointing
    from megatron_ext.presets import get_preset

    # A checkpoint with everything but the model: marco_model.json, common state, RNG.
    weightless = str(tmp_path / "weightless")
    checkpointing.save_checkpoint(weightless, checkpointing.TrainState(), [],
                                  model_info=checkpointing.model_info(get_preset("tiny")))
    out = str(tmp_path / "out" / "hf")  # its parent does not exist either: must not appear
    assert_fails(capsys, ["--load", weightless, "--out", out], "holds no model weights", tmp_path)
    assert_fails(capsys, ["--load", str(tmp_path / "nope"), "--out", out], "no such checkpoint",
                 tmp_path)

    src, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    make_dense_qwen3(str(src))
    assert IMPORT.main(["--hf-dir", str(src), "--save", str(ckpt)]) == 0
    capsys.readouterr()
    assert_fails(capsys, ["--load", str(ckpt), "--out", out, "--tokenizer-dir",
                          str(tmp_path / "no_tokenizer")], "no such tokenizer directory", tmp_path)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert_fails(capsys, ["--load", str(ckpt), "--out", str(existing)], "pass --overwrite",
                 tmp_path)
    assert (existing / "keep.txt").read_text() == "mine"
    assert EXPORT.main(["--load", str(ckpt), "--out", str(existing), "--overwrite"]) == 0
    assert not (existing / "keep.txt").exists() and (existing / "config.json").exists()
    assert _leftovers(tmp_path) == ["ckpt", "existing", "hf", "weightless"]

    # Import: an existing output without --overwrite, a sparse model with dense layers.
    capsys.readouterr()
    assert IMPORT.main(["--hf-dir", str(src), "--save", str(ckpt)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    moe = tmp_path / "moe_hf"
    make_moe_qwen3(str(moe), mlp_only_layers=[1])
    capsys.readouterr()  # save_pretrained's progress bar
    assert IMPORT.main(["--hf-dir", str(moe), "--save", str(tmp_path / "moe")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mlp_only_layers" in err[0], err
    assert not (tmp_path / "moe").exists()


# ------------------------------------------------------------------------------------------
# Trainer checkpoints saved by two gloo processes.
LAYOUTS = {
    "DP=2 dense": ["--preset", "tiny-dense"],
    "DP=2 EP=2 MoE": ["--preset", "tiny", "--expert-model-parallel-size", "2"],
}


@pytest.fixture(scope="module")
def parallel_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    out = {}
    for name, flags in LAYOUTS.items():
        ckpt = root / name.replace(" ", "_").replace("=", "")
        run = run_pretrain(*flags, "--micro-batch-size", "1", "--seq-length", "64",
                           "--train-iters", "2", "--lr", "1e-2", "--save", str(ckpt), nproc=2)
        assert run.returncode == 0, run.stderr[-3000:]
        out[name] = ckpt
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_trainer_checkpoint_exports_with_megatron_logits(megatron_single_rank, fresh_moe_tracker,
                                                         parallel_checkpoints, tmp_path, name):
    from megatron_ext import checkpointing

    ckpt, hf_dir = parallel_checkpoints[name], tmp_path / "hf"
    assert EXPORT.main(["--load", str(ckpt), "--out", str(hf_dir)]) == 0
    preset = checkpointing.preset_from_checkpoint(str(ckpt))
    gap = logit_gap(str(ckpt), str(hf_dir), preset.vocab_size)
    print(f"{name}: HF vs Megatron logits max abs diff {gap:.2e}")
    assert gap < 1e-4, gap

    config = json.load(open(hf_dir / "config.json"))
    assert config["architectures"] == [("Qwen3MoeForCausalLM" if preset.is_moe else "Qwen3ForCausalLM")]
    assert (config["tie_word_embeddings"], config["rope_theta"], config["head_dim"],
            config["rms_norm_eps"], config["torch_dtype"]) == (True, 1e6, 32, 1e-6, "float32")
    if preset.is_moe:
        assert (config["model_type"], config["num_experts"], config["num_experts_per_tok"],
                config["moe_intermediate_size"], config["norm_topk_prob"],
                config["decoder_sparse_step"], config["mlp_only_layers"]) == (
                    "qwen3_moe", 16, 4, 128, True, 1, [])
    else:
        assert (config["model_type"], config["intermediate_size"]) == ("qwen3", 512)
    assert json.load(open(hf_dir / "generation_config.json"))["eos_token_id"] == 2

    # The trainer recorded the shipped SentencePiece tokenizer: generation decodes to text.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    enc = tok("NAME\nls - list", return_tensors="pt")
    out = load_hf(str(hf_dir)).generate(**enc, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("NAME\nls - list") and len(out[0]) > enc["input_ids"].shape[1]


# ------------------------------------------------------------------------------------------
# Damaged and diverged checkpoints: one line naming the checkpoint and the file or tensor,
# from the export and from the routing analysis (which loads through Megatron), nothing written.
ROUTING = load_tool("analyze_routing")


def _damage(ckpt, case):
    """A copy of checkpoint root `ckpt` with one kind of damage; returns (root, what the error
    line says about the file)."""
    import shutil

    root = ckpt.parent / case
    shutil.copytree(ckpt, root)
    it = root / "iter_0000000"
    data = it / "__0_0.distcp"
    if case == "truncated_distcp":
        os.truncate(data, os.path.getsize(data) // 2)
        return root, "__0_0.distcp is truncated"
    if case == "garbled_distcp":  # the right length, garbage inside: only a read can tell
        with open(data, "r+b") as f:
            f.write(b"\0" * os.path.getsize(data))
        return root, "reading __0_0.distcp failed"
    if case == "missing_metadata":
        os.remove(it / ".metadata")
        return root, ".metadata is missing"
    if case == "truncated_metadata":
        os.truncate(it / ".metadata", os.path.getsize(it / ".metadata") // 2)
        return root, ".metadata is truncated"
    os.remove(it / "common.pt")
    return root, "common.pt is missing"


DAMAGE = ["truncated_distcp", "garbled_distcp", "missing_metadata", "truncated_metadata",
          "missing_common"]


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    """A tiny qwen3_moe imported as a Megatron checkpoint, and two 2-language corpora for it."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("moe_ckpt")
    make_moe_qwen3(str(root / "hf"), seed=3)
    assert IMPORT.main(["--hf-dir", str(root / "hf"), "--save", str(root / "ckpt")]) == 0
    corpus = []
    for lang in ("aa", "bb"):
        builder = IndexedDatasetBuilder(str(root / f"{lang}.bin"), dtype=np.uint16)
        builder.add_item(torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(1)))
        builder.end_document()
        builder.finalize(str(root / f"{lang}.idx"))
        corpus.append(f"{lang}={root / lang}")
    return root / "ckpt", corpus


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    return errors[0]


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_checkpoint_is_one_line(megatron_single_rank, fresh_moe_tracker, moe_checkpoint,
                                        capsys, tmp_path, case):
    ckpt, corpus = moe_checkpoint
    root, named = _damage(ckpt, case)
    where = f"--load {root / 'iter_0000000'}: "
    out = tmp_path / "out"
    for tool, argv in ((EXPORT, ["--load", str(root), "--out", str(out)]),
                       (ROUTING, ["--load", str(root), "--out", str(out), "--corpus", *corpus,
                                  "--max-tokens-per-language", "64", "--seq-length", "32"])):
        capsys.readouterr()
        assert tool.main(argv) == 2
        line = _one_error_line(capsys)
        assert line.startswith("error: " + where), line
        if tool is ROUTING and case == "garbled_distcp":
            assert "corrupt" in line, line  # Megatron's load (checkpointing.load_checkpoint)
        else:
            assert named in line, line
        assert not out.exists() and os.listdir(tmp_path) == []


def test_non_finite_weights_are_refused_unless_allowed(megatron_single_rank, fresh_moe_tracker,
                                                       capsys, tmp_path):
    from safetensors.torch import save_file

    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    make_dense_qwen3(str(src), seed=4)
    weights = hf_tensors(src)  # a diverged run: NaN and inf in one of layer 1's projections
    weights["model.layers.1.self_attn.k_proj.weight"][3, :2] = torch.tensor([float("nan"), float("inf")])
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert IMPORT.main(["--hf-dir", str(src), "--save", str(ckpt)]) == 0
    capsys.readouterr()
    assert EXPORT.main(["--load", str(ckpt), "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: --load {ckpt / 'iter_0000000'}: tensor "
                           "decoder.layers.self_attention.linear_qkv.weight (layer 1) holds 2 "
                           "non-finite value(s)"), line
    assert "--allow-non-finite" in line
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]  # nothing written, no temporary

    assert EXPORT.main(["--load", str(ckpt), "--out", str(out), "--allow-non-finite"]) == 0
    back = hf_tensors(out)["model.layers.1.self_attn.k_proj.weight"]
    assert back[3, 0].isnan() and back[3, 1] == float("inf")
    assert torch.equal(back[4:], weights["model.layers.1.self_attn.k_proj.weight"][4:])
