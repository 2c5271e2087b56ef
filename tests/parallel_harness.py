"""Train one model at several parallel layouts and compare them (tests/test_parallel_layouts.py).

Test side:  `launch(jobs, nproc, workdir)` starts this file once, under torchrun when
nproc > 1 (gloo, CPU), and runs every job of the list in the same processes, one after the
other: importing Megatron costs seconds per process, so one launch serves many layouts.

Worker side (`python tests/parallel_harness.py SPEC.json`), per job:
  - "init" (one process): build the model once, seeded, and save its weights: the fixed start
    checkpoint every layout loads.
  - "train": `pretrain_marco.py`'s Trainer at the job's layout flags, from a checkpoint, over
    the same global batches (the data order is a pure function of the step). Records per-step
    metrics and routing (tokens per expert, closest top-k tie); saves a checkpoint at the end
    (and at --save-interval) and the first step's gradients as a weights-only checkpoint.
  - "compare" (one process): loads checkpoints at TP=PP=EP=1 and reports, per tensor of the
    full model, the difference to a reference checkpoint, whatever layouts saved them.
Results go to SPEC's "out" file as JSON, keyed by job name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Shrunk tiny preset: 2 layers so that PP=2 has one layer per stage, 16 experts x 128 top-4,
# 128 tokens (divisible by TP for sequence parallelism). Global batch 8 = 4 micro-batches of 2
# on one rank, 1 on each of 4 data-parallel ranks: the set of micro-batches is the same at
# every layout, so Megatron's per-micro-batch aux loss and loss averaging are layout-free.
# --adam-eps 1e-6 (Megatron's default is 1e-8): where |grad| < eps, Adam's step is about
# lr * grad / eps, so eps = 1e-8 turns the ~1e-10 absolute gradient differences of another
# summation order into ~3e-5 weight differences (docs/parallelism.md has the measurements).
# Seed 10: in the reference run no token's k-th and (k+1)-th router logits come closer than
# 1.8e-5, far above the layouts' rounding differences, so top-k routing cannot flip.
TRAIN_ITERS = 5
SEED = 10
COMMON = [
    "--num-layers", "2", "--seq-length", "128", "--micro-batch-size", "2",
    "--global-batch-size", "8", "--lr", "3e-3", "--adam-eps", "1e-6", "--seed", str(SEED),
    "--log-interval", "1000", "--peak-tflops", "1",
]


# ----------------------------------------------------------------------------- test side
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    # One thread per process everywhere: the reference and the parallel runs then use the same
    # matmul kernels (thread count can change a CPU GEMM's blocking and so its rounding).
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launch(jobs: list[dict], nproc: int, workdir: Path, timeout: int = 900) -> dict:
    """Run `jobs` in one set of `nproc` processes; returns {job name: result}."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{len(list(workdir.glob('spec_*.json')))}_{nproc}procs"  # one spec/results per launch
    spec = workdir / f"spec_{tag}.json"
    out = workdir / f"results_{tag}.json"
    spec.write_text(json.dumps({"jobs": jobs, "out": str(out)}))
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), __file__, str(spec)]
    else:
        cmd = [sys.executable, __file__, str(spec)]
    run = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"{nproc}-process job failed (rc {run.returncode}):\n"
                           f"{run.stdout[-2000:]}\n{run.stderr[-6000:]}")
    return json.loads(out.read_text())


def train_job(name: str, flags: list[str], workdir: Path, *, preset: str = "tiny",
              load: str | None = None, save_interval: int | None = None,
              train_iters: int = TRAIN_ITERS, grads: bool = True) -> dict:
    """Train at the layout `flags`; the final checkpoint goes to workdir/name and, with
    `grads`, the first step's gradients (as a weights-only checkpoint) to workdir/name-grads."""
    args = ["--preset", preset, *COMMON, "--train-iters", str(train_iters),
            "--save", str(workdir / name), *flags]
    if load:
        args += ["--load", load]
    if save_interval:
        args += ["--save-interval", str(save_interval)]
    distributed_optimizer = "--use-distributed-optimizer" in flags
    return {"kind": "train", "name": name, "args": args,
            "grads_path": str(workdir / f"{name}-grads") if grads and not distributed_optimizer
            else None}


def compare_job(name: str, reference: str, checkpoints: dict[str, str]) -> dict:
    return {"kind": "compare", "name": name, "reference": reference, "checkpoints": checkpoints}


def start_checkpoint_job(path: str, preset: str = "tiny") -> dict:
    """Initialise the model once (seeded) and save its weights only: iteration 0, no optimizer;
    every layout then loads these weights (a fresh optimizer starts from them)."""
    return {"kind": "init", "name": f"init-{preset}", "path": path,
            "args": ["--preset", preset, *COMMON]}


def with_optimizer_format(job: dict, sharding_type: str) -> dict:
    """Save/load the distributed optimizer in another dist_checkpointing format than
    checkpointing.py's (dp_reshardable), e.g. "fully_reshardable"."""
    return {**job, "optimizer_format": sharding_type}


# ----------------------------------------------------------------------------- worker side
def reset_process_globals() -> None:
    """Megatron state that outlives a model: the aux-loss tracker is sized by the first model
    built, and the MoE loss scale is a class attribute."""
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_moe_layer_wise_logging_tracker,
    )

    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None


class _RoutingProbe:
    """Per step and MoE layer, over all ranks: tokens per expert, and the smallest gap between
    a token's k-th and (k+1)-th router logit (how close top-k routing came to a tie; fp32
    rounding can only change routing decisions closer than that)."""

    def __init__(self, model_chunks, num_layers: int, num_experts: int, topk: int):
        import torch
        from megatron.core.transformer.moe.router import TopKRouter

        self.topk = topk
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.margins = torch.full((num_layers,), float("inf"), dtype=torch.float64)
        self.steps = []
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._hook(module.layer_number - 1))

    def _hook(self, layer: int):
        def record(module, inputs, outputs):
            if not module.training:
                return
            _, routing_map = outputs
            self.counts[layer] += routing_map.sum(dim=0).double()
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            top = (x @ module.weight.detach().float().t()).topk(self.topk + 1, dim=-1).values
            gap = (top[:, self.topk - 1] - top[:, self.topk]).min().double()
            self.margins[layer] = min(self.margins[layer], gap)

        return record

    def end_step(self) -> None:
        import torch.distributed as dist

        counts, margins = self.counts.clone(), self.margins.clone()
        dist.all_reduce(counts)
        dist.all_reduce(margins, op=dist.ReduceOp.MIN)
        self.steps.append({"tokens_per_expert": counts.long().tolist(),
                           "min_topk_margin": margins.tolist()})
        self.counts.zero_()
        self.margins.fill_(float("inf"))


def _run_train(job: dict) -> dict:
    if job.get("optimizer_format") == "fully_reshardable":
        job = {**job, "args": [*job["args"], "--dist-ckpt-optim-fully-reshardable"]}
    return _train(job)


def _train(job: dict) -> dict:
    import torch

    from megatron_ext import checkpointing, data
    from megatron_ext.arguments import parse_args
    from megatron_ext.trainer import Trainer

    reset_process_globals()
    t0 = time.perf_counter()
    cfg = parse_args(job["args"])
    trainer = Trainer(cfg)
    m = cfg.model
    probe = (_RoutingProbe(trainer.model, m.num_layers, m.num_experts, m.moe_router_topk)
             if m.is_moe else None)
    scalars = []  # every step's metrics, on every rank (the trainer's JSON log is one rank's)
    log_step = trainer.metrics.log_step

    def record(step, values, per_layer):
        scalars.append(values)
        if probe is not None:
            probe.end_step()
        log_step(step, values, per_layer)

    trainer.metrics.log_step = record
    # The first step's gradients, reduced and finalised, before clipping and Adam: what a
    # layout computes, free of the optimizer's amplification of rounding differences. (Not
    # with the distributed optimizer: each rank then holds only its shard of the reduced grads.)
    first_grads = {}
    optimizer_step = trainer.optimizer.step

    def step_keeping_first_grads():
        if not first_grads:
            for chunk in trainer.model:
                for param in chunk.module.parameters():
                    first_grads[param] = param.main_grad.detach().clone()
        return optimizer_step()

    if job.get("grads_path"):
        trainer.optimizer.step = step_keeping_first_grads
    losses = trainer.train()  # saves the final checkpoint (--save)
    if job.get("grads_path"):
        with torch.no_grad():
            for param, grad in first_grads.items():
                param.copy_(grad)
        checkpointing.save_checkpoint(
            job["grads_path"], checkpointing.TrainState(), trainer.model,
            model_info=checkpointing.model_info(m, tokenizer=data.tokenizer_info(
                cfg.data.tokenizer_type, cfg.data.tokenizer_model)))
    keys = ("grad_norm", "load_balancing_loss", "z_loss")
    return {"losses": losses, **{k: [s.get(k) for s in scalars] for k in keys},
            "routing": probe.steps if probe else None, "seconds": time.perf_counter() - t0}


def _run_init(job: dict) -> dict:
    import torch.distributed as dist

    from megatron_ext import checkpointing, data
    from megatron_ext.arguments import parse_args
    from megatron_ext.model import build_stage
    from megatron_ext.parallel import init_distributed

    reset_process_globals()
    cfg = parse_args(job["args"])
    init_distributed(cfg.layout, cfg.batch.seed)
    assert dist.get_world_size() == 1, "the start checkpoint is written by one process"
    model, _ = build_stage(cfg.model, cfg.model_options, cfg.layout,
                           seq_length=cfg.batch.seq_length)
    info = checkpointing.model_info(cfg.model, tokenizer=data.tokenizer_info(
        cfg.data.tokenizer_type, cfg.data.tokenizer_model))
    checkpointing.save_checkpoint(job["path"], checkpointing.TrainState(), [model],
                                  model_info=info)
    return {"path": job["path"]}


def _full_state(path: str) -> dict:
    import torch

    from megatron_ext.inference.loading import load_model_from_checkpoint

    reset_process_globals()
    model, _ = load_model_from_checkpoint(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and "_extra_state" not in k}


def _run_compare(job: dict) -> dict:
    """Per checkpoint, against the reference, over all tensors of the full model:
      max_rel_l2  the worst tensor's ||a - ref|| / ||ref||
      max_rel     the worst tensor's max |a - ref| / max |ref| (elementwise)
      max_abs     max |a - ref|"""
    from megatron_ext.parallel import ParallelLayout, init_distributed

    reset_process_globals()
    init_distributed(ParallelLayout(), seed=0)  # one process: the common layout TP=PP=EP=1
    ref = _full_state(job["reference"])
    out = {}
    for name, path in job["checkpoints"].items():
        state = _full_state(path)
        if set(state) != set(ref):
            differ = sorted(set(state) ^ set(ref))[:5]
            raise AssertionError(f"{name}: tensor names differ from the reference: {differ}")
        res = {"max_abs": 0.0, "max_rel": 0.0, "max_rel_l2": 0.0, "worst_tensor": None}
        for k, r in ref.items():
            r, a = r.double(), state[k].double()
            diff = (a - r).abs()
            rel = diff.max().item() / max(r.abs().max().item(), 1e-30)
            rel_l2 = diff.norm().item() / max(r.norm().item(), 1e-30)
            res["max_abs"] = max(res["max_abs"], diff.max().item())
            res["max_rel"] = max(res["max_rel"], rel)
            if rel_l2 >= res["max_rel_l2"]:
                res["max_rel_l2"], res["worst_tensor"] = rel_l2, k
        out[name] = res
    return out


def worker(spec_path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from megatron_ext import parallel

    spec = json.loads(Path(spec_path).read_text())
    results = {}
    for job in spec["jobs"]:
        run = {"train": _run_train, "init": _run_init, "compare": _run_compare}[job["kind"]]
        results[job["name"]] = run(job)
        if dist.is_initialized():
            dist.barrier()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["out"]).write_text(json.dumps(results, indent=1))
    parallel.shutdown()


if __name__ == "__main__":
    worker(sys.argv[1])
