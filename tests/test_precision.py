"""Mixed precision through the real entry point: `--bf16` runs on CPU too, so Megatron's
mixed-precision optimizers (fp32 main params beside bf16 model params) are exercised in CI.

The defect this guards against: the optimizer is built (and clones its fp32 main params from
the random init) before `--load` copies a weights-only checkpoint (upcycled, imported, or
`--no-load-optim`) into the model; without `reload_model_params` the first step copied the
random main params back, so the run trained from scratch. With lr = 0 a step must leave the
loaded weights exactly as they were, for the plain and the distributed optimizer.
"""

import pytest
import torch
from conftest import pretrained_checkpoint, run_pretrain

SMALL = ["--preset", "tiny", "--mock-data", "--micro-batch-size", "2", "--seq-length", "64",
         "--seed", "3", "--log-interval", "1"]


def _weights(root) -> dict:
    from megatron_ext import checkpointing
    from megatron_ext.convert.mcore_reader import McoreCheckpointReader

    ckpt = checkpointing.resolve_checkpoint_dir(str(root))
    reader = McoreCheckpointReader(ckpt, checkpointing.preset_from_checkpoint(ckpt))
    out = dict(reader.globals())
    for i in range(reader.preset.num_layers):
        out.update({f"{i}.{k}": v for k, v in reader.layer(i).items()})
    return out


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    return pretrained_checkpoint(tmp_path_factory.mktemp("bf16") / "ckpt", *SMALL, "--bf16",
                                 "--train-iters", "2")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["plain", "distributed"])
def test_weights_only_load_survives_the_first_bf16_step(bf16_checkpoint, tmp_path, optimizer):
    flags = ["--use-distributed-optimizer"] if optimizer == "distributed" else []
    after = tmp_path / "after"
    result = run_pretrain(*SMALL, "--bf16", *flags, "--train-iters", "3", "--load",
                          str(bf16_checkpoint), "--no-load-optim", "--lr", "0", "--min-lr", "0",
                          "--save", str(after))
    assert result.returncode == 0, result.stderr[-3000:]
    loaded, saved = _weights(bf16_checkpoint), _weights(after)
    assert loaded.keys() == saved.keys()
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.bfloat16, name
        # lr = 0: Adam's update and weight decay are exactly zero.
        assert torch.equal(tensor, saved[name]), name
