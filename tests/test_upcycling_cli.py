"""tools/upcycle_hf_to_mcore.py as a command: bad input (one line, exit 2, nothing left
behind), too little disk space, --dry-run, --overwrite, cleanup after a failure mid-write and
of the temporaries of killed runs, and the trainer starting from the output."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, run_pretrain, subprocess_env
from helpers_hf import load_upcycle_tool, make_dense_qwen3, write_tokenizer_stub

TOOL = load_upcycle_tool()
EXPERTS = ["--num-experts", "8", "--moe-ffn-hidden-size", "64", "--moe-router-topk", "4"]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dense"))
    make_dense_qwen3(path)  # FFN 256
    write_tokenizer_stub(path)
    return path


def _leftovers(parent):
    return [n for n in os.listdir(parent) if ".tmp-upcycle-" in n or ".old-upcycle-" in n]


def assert_fails(capsys, argv, match, out_dir):
    parent = os.path.dirname(out_dir)
    before = sorted(os.listdir(parent)) if os.path.isdir(parent) else None
    assert TOOL.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    after = sorted(os.listdir(parent)) if os.path.isdir(parent) else None
    assert after == before  # nothing written, not even a temporary directory


def _copy(src, dst, skip=()):
    os.makedirs(dst)
    for name in os.listdir(src):
        if name not in skip:
            shutil.copy(os.path.join(src, name), dst)
    return dst


def test_bad_input(capsys, tmp_path, dense_dir, monkeypatch):
    out = str(tmp_path / "out")
    args = ["--save", out, *EXPERTS]
    assert_fails(capsys, ["--hf-dir", str(tmp_path / "missing"), *args], "no such directory", out)
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    assert_fails(capsys, ["--hf-dir", empty, *args], "no config.json", out)
    no_weights = _copy(dense_dir, str(tmp_path / "no_weights"), skip=("model.safetensors",))
    assert_fails(capsys, ["--hf-dir", no_weights, *args], "no model.safetensors", out)

    llama = _copy(dense_dir, str(tmp_path / "llama"))
    cfg = json.load(open(os.path.join(llama, "config.json")))
    json.dump({**cfg, "model_type": "llama"}, open(os.path.join(llama, "config.json"), "w"))
    assert_fails(capsys, ["--hf-dir", llama, *args], "'llama' is not a Qwen3", out)
    moe = _copy(dense_dir, str(tmp_path / "moe"))
    json.dump({**cfg, "model_type": "qwen3_moe"}, open(os.path.join(moe, "config.json"), "w"))
    assert_fails(capsys, ["--hf-dir", moe, *args], "already a MoE", out)

    truncated = _copy(dense_dir, str(tmp_path / "truncated"))
    weights = os.path.join(truncated, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) - 1000)
    assert_fails(capsys, ["--hf-dir", truncated, *args], "truncated or corrupt", out)
    shapes = _copy(dense_dir, str(tmp_path / "shapes"))
    json.dump({**cfg, "head_dim": 8}, open(os.path.join(shapes, "config.json"), "w"))
    assert_fails(capsys, ["--hf-dir", shapes, *args], "config.json implies (32, 64)", out)

    base = ["--hf-dir", dense_dir, "--save", out]
    experts = lambda e, f, k: ["--num-experts", e, "--moe-ffn-hidden-size", f,  # noqa: E731
                               "--moe-router-topk", k]
    assert_fails(capsys, base + experts("8", "96", "4"), "does not divide the dense FFN size 256",
                 out)
    assert_fails(capsys, base + experts("10", "64", "4"), "10 is not a multiple of N = 4", out)
    assert_fails(capsys, base + experts("8", "64", "2"), "2 is not a multiple of N = 4", out)
    assert TOOL.main(base + experts("8", "64", "2") + ["--router-init", "random", "--dry-run"]) == 0
    for ratio in ("1.0", "-0.1", "nan"):
        assert_fails(capsys, base + EXPERTS + ["--drop-ratio", ratio], "must be in [0, 1)", out)
    assert_fails(capsys, base + ["--preset", "nano"], "--preset nano has num_layers = 28", out)
    assert_fails(capsys, base + ["--preset", "tiny-dense"], "dense preset", out)
    assert_fails(capsys, base + ["--preset", "huge"], "unknown preset", out)
    assert_fails(capsys, base + ["--num-experts", "8"], "missing --moe-ffn-hidden-size", out)

    # Too little free space, in units that fit a small model (it used to say "0.0 GiB").
    from megatron_ext.cli import human_bytes
    from megatron_ext.convert.hf_config import preset_fields_from_hf_config, read_hf_config
    from megatron_ext.presets import ModelPreset

    fields = preset_fields_from_hf_config(read_hf_config(dense_dir))
    needed = TOOL.checkpoint_bytes(ModelPreset(name="x", description="", num_experts=8,
                                               moe_ffn_hidden_size=64, moe_router_topk=4, **fields),
                                   "fp32")
    assert 2**19 < needed < 2**20  # under a MiB: "0.0 GiB" before
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=100 * 1024))
    assert_fails(capsys, base + EXPERTS, f"needs about {human_bytes(needed)}, 100.0 KiB free", out)
    monkeypatch.undo()

    os.makedirs(out)
    open(os.path.join(out, "keep.txt"), "w").write("user data")
    assert_fails(capsys, base + EXPERTS, "not empty; pass --overwrite", out)
    assert open(os.path.join(out, "keep.txt")).read() == "user data"


def test_cli_exit_code_and_dry_run(tmp_path, dense_dir):
    out = str(tmp_path / "out")
    cmd = [sys.executable, os.path.join(REPO, "tools", "upcycle_hf_to_mcore.py")]
    bad = subprocess.run(cmd + ["--hf-dir", str(tmp_path / "nope"), "--save", out, *EXPERTS],
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert bad.stderr.startswith("error: --hf-dir") and not os.path.exists(out)

    dry = subprocess.run(cmd + ["--hf-dir", dense_dir, "--save", out, *EXPERTS, "--dry-run"],
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "N = 4 slices of 64" in dry.stdout and "M = 2 replicas -> 8 experts" in dry.stdout
    assert "scale: marco (W_gate x 1.5874" in dry.stdout and "drop ratio 0.5" in dry.stdout
    assert not os.path.exists(out)


def test_overwrite_and_tokenizer_record(megatron_single_rank, tmp_path, dense_dir):
    out = str(tmp_path / "out")
    os.makedirs(out)
    open(os.path.join(out, "stale.txt"), "w").write("old")
    # A run killed mid-write (its process is gone) left its temporary: this run removes it.
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    os.makedirs(f"{out}.tmp-upcycle-{killed.pid}")
    open(f"{out}.tmp-upcycle-{killed.pid}/shard.distcp", "wb").write(b"x" * 4096)
    assert TOOL.main(["--hf-dir", dense_dir, "--save", out, *EXPERTS, "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["iter_0000000", "latest_checkpointed_iteration.txt"]
    info = json.load(open(os.path.join(out, "iter_0000000", "marco_model.json")))
    tokenizer = {"type": "HuggingFaceTokenizer", "model": os.path.abspath(dense_dir)}
    assert info["tokenizer"] == tokenizer
    assert info["preset"]["num_experts"] == 8 and _leftovers(str(tmp_path)) == []


def test_failure_mid_write_leaves_nothing(megatron_single_rank, tmp_path, dense_dir, monkeypatch,
                                          capsys):
    from megatron_ext.convert import upcycling

    real, calls = upcycling.UpcycledCheckpoint.chunk, []

    def failing(self, key, offsets, sizes):
        calls.append(key)
        if len(calls) == 20:
            raise OSError("disk full (simulated)")
        return real(self, key, offsets, sizes)

    monkeypatch.setattr(upcycling.UpcycledCheckpoint, "chunk", failing)
    out = str(tmp_path / "new" / "out")
    assert TOOL.main(["--hf-dir", dense_dir, "--save", out, *EXPERTS]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: writing --save") and err.endswith("disk full (simulated)")
    assert len(calls) == 20 and os.listdir(tmp_path) == []  # not even the parent it created


def test_trainer_starts_from_the_upcycled_checkpoint(tmp_path):
    """The real command line: tiny-dense-shaped HF model -> `--preset tiny` -> pretrain_marco."""
    hf, out = str(tmp_path / "hf"), str(tmp_path / "moe")
    make_dense_qwen3(hf, num_hidden_layers=4, hidden_size=128, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, intermediate_size=512, vocab_size=8192,
                     max_position_embeddings=2048)
    tool = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "upcycle_hf_to_mcore.py"), "--hf-dir", hf,
         "--save", out, "--preset", "tiny", "--drop-ratio", "0.5"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert tool.returncode == 0, tool.stderr[-2000:]
    assert "M = 4 replicas -> 16 experts" in tool.stdout
    run = run_pretrain("--preset", "tiny", "--load", out, "--mock-data", "--train-iters", "2",
                       "--micro-batch-size", "2", "--seq-length", "64", "--log-interval", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = [line for line in (run.stdout + run.stderr).splitlines()
              if line.startswith(f"loaded model weights from {out}")]  # the root or iter_0000000
    assert len(loaded) == 1 and "(iteration 0" in loaded[0], run.stdout[-2000:]
