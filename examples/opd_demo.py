#!/usr/bin/env python3
"""Cascaded on-policy distillation on CPU: a student, then teacher A, then the stronger teacher B.

    python examples/opd_demo.py --student runs/posttrain_quickstart/sft/ckpt/iter_0000050 \\
        --teachers runs/posttrain_quickstart/sft/ckpt/iter_0000100 \\
                   runs/posttrain_quickstart/sft/ckpt/iter_0000150 \\
        --out runs/posttrain_quickstart/opd --json runs/posttrain_quickstart/opd/summary.json

What examples/posttrain_quickstart.sh runs after its SFT step: the Marco Instruct recipe's
second half at toy scale, honestly: the teachers must be measurably better than the student,
or there is nothing to distil.

1. Teachers: `--teachers A B`, two checkpoints of any preset (the quickstart takes its own SFT
   run's checkpoints at steps 100 and 150 as A and B, and the one at step 50 as the student: a
   stronger teacher is a model trained longer on the same data, at no extra cost on a CPU).
   Without `--teachers`, the demo trains two dense teachers (`tiny-dense` with more layers
   than the student: --teacher-a / --teacher-b give layers, pre-training and SFT steps) on
   the corpus (--corpus-dir, else the bundled one) and the bundled SFT sample; that takes
   about half an hour on 2 cores. Either way the token maps are equal (one tokenizer).
2. The held-out assistant-token loss (the SFT sample's held-out conversations) of student, A
   and B; the demo stops with an error unless B < A < student.
3. The cascade configs/posttrain/tiny_cascade.yaml (A, then B; sampled-rkl, Marco's loss) from
   the student, one `posttrain_marco.py opd` run. Before each phase's first step and after its
   last, it evaluates the per-token reverse KL to that phase's teacher on held-out prompts
   (exact, full vocabulary, on the student's own samples at a fixed seed) and the held-out
   assistant loss.
4. A JSON summary: opd_phases [{name, teacher, heldout_rkl_before/after,
   heldout_assistant_loss_before/after}], teacher_heldout_assistant_loss {phase: loss},
   student_heldout_assistant_loss, and the mean OPD step time split into rollout / teacher
   scoring / training.

Everything runs in this one process (the training entry points' `main`), which saves the few
seconds each Megatron import costs. Environment: MARCO_CACHE (prepared data), OMP_NUM_THREADS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_ext.cli import HelpFormatter, run_tool  # noqa: E402
from megatron_ext.errors import MarcoError  # noqa: E402

CASCADE = os.path.join(REPO, "configs", "posttrain", "tiny_cascade.yaml")
SFT_VALID = "validation/lm_loss/sft_valid"
# name: (layers, pre-training steps, SFT steps) of 8 x 256 tokens.
TEACHERS = {"A": (6, 150, 100), "B": (8, 150, 250)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--student", required=True, help="the SFT student's checkpoint")
    p.add_argument("--teachers", nargs=2, metavar=("A", "B"),
                   help="checkpoints of teachers A and B (default: train two dense teachers here)")
    p.add_argument("--tokenizer-model", help="the student's SentencePiece model (default: the "
                   "tokenizer its checkpoint records)")
    p.add_argument("--corpus-dir", help="preprocessed corpus (train_<lang>_text_document "
                   "prefixes, examples/quickstart.sh's data/) for the teachers' pre-training; "
                   "default: the bundled corpus")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--json", help="summary JSON (default: OUT/summary.json)")
    p.add_argument("--cascade", default=CASCADE, help="the cascade file (teachers as "
                   "${MARCO_OPD_TEACHER_A} / ${MARCO_OPD_TEACHER_B})")
    for name, (layers, pre, sft) in TEACHERS.items():
        p.add_argument(f"--teacher-{name.lower()}", nargs=3, type=int, default=[layers, pre, sft],
                       metavar=("LAYERS", "PRETRAIN_ITERS", "SFT_ITERS"),
                       help=f"teacher {name}: tiny-dense layers, pre-training and SFT steps")
    p.add_argument("--seed", type=int, default=1234, help="seed of the teachers' and the student's runs")
    return p


def _main(module: str, argv: list[str]) -> None:
    """Run an entry point's main() here; any failure is one MarcoError line."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()  # sized by the model it first sees
    entry = __import__(module)
    if entry.main(argv) != 0:
        raise MarcoError(f"{module}.py {' '.join(argv[:3])} ... failed")


def _records(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


class Demo:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        tok = args.tokenizer_model or self._recorded_tokenizer(args.student)
        self.common = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok,
                       "--seed", str(args.seed), "--peak-tflops", "1"]
        cache = os.environ.get("MARCO_CACHE")
        if cache:
            self.common += ["--data-cache-path", cache]
        self.seconds = {}

    @staticmethod
    def _recorded_tokenizer(ckpt: str) -> str:
        from megatron_ext import checkpointing

        info = checkpointing.read_model_info(ckpt).get("tokenizer") or {}
        if not info.get("tokenizer_model"):
            raise MarcoError(f"--student {ckpt} records no tokenizer; pass --tokenizer-model")
        return info["tokenizer_model"]

    def _corpus(self) -> list[str]:
        d = self.args.corpus_dir
        if not d:
            return []
        prefixes = sorted(os.path.join(d, f[:-4]) for f in os.listdir(d)
                          if f.startswith("train_") and f.endswith("_text_document.bin"))
        if not prefixes:
            raise MarcoError(f"--corpus-dir {d}: no train_*_text_document.bin")
        return ["--data-path", *prefixes, "--split", "100,0,0"]

    # ------------------------------------------------------------------ steps
    def teacher(self, name: str, layers: int, pretrain: int, sft: int) -> str:
        root = os.path.join(self.out, f"teacher_{name}")
        t0 = time.time()
        _main("pretrain_marco", ["--preset", "tiny-dense", "--num-layers", str(layers), *self.common,
                                 *self._corpus(), "--micro-batch-size", "8", "--seq-length", "256",
                                 "--train-iters", str(pretrain), "--lr", "3e-3", "--min-lr", "3e-4",
                                 "--log-interval", "50", "--save", f"{root}/pretrain",
                                 "--log-json", f"{root}/pretrain.jsonl"])
        _main("posttrain_marco", ["sft", "--load", f"{root}/pretrain", *self.common,
                                  "--micro-batch-size", "8", "--seq-length", "256",
                                  "--train-iters", str(sft), "--lr", "1e-3", "--min-lr", "1e-4",
                                  "--lr-warmup-iters", "10", "--log-interval", "50",
                                  "--save", f"{root}/ckpt", "--log-json", f"{root}/sft.jsonl"])
        self.seconds[f"teacher_{name}"] = round(time.time() - t0, 1)
        return f"{root}/ckpt"

    def assistant_loss(self, ckpt: str, tag: str) -> float:
        log = os.path.join(self.out, f"heldout_{tag}.jsonl")
        if os.path.exists(log):
            os.remove(log)
        _main("posttrain_marco", ["sft", "--load", ckpt, *self.common, "--micro-batch-size", "8",
                                  "--seq-length", "256", "--skip-train", "--finetune", "--log-json", log])
        return next(r[SFT_VALID] for r in _records(log) if SFT_VALID in r)

    def cascade(self, teachers: dict[str, str]) -> tuple[list[dict], dict]:
        import yaml

        phases = yaml.safe_load(open(self.args.cascade))["phases"]
        ends, total = [], 0
        for p in phases:
            total += int(p["steps"])
            ends.append(total)
        interval = math.gcd(*ends)
        root = os.path.join(self.out, "cascade")
        log = os.path.join(root, "log.jsonl")
        if os.path.exists(log):
            os.remove(log)
        os.environ["MARCO_OPD_TEACHER_A"], os.environ["MARCO_OPD_TEACHER_B"] = teachers["A"], teachers["B"]
        t0 = time.time()
        _main("posttrain_marco", ["opd", "--cascade", self.args.cascade, "--load", self.args.student,
                                  *self.common, "--micro-batch-size", "8", "--seq-length", "256",
                                  "--eval-interval",
                                  str(interval), "--eval-assistant-data", "--log-interval", "5",
                                  "--save", f"{root}/ckpt", "--log-json", log,
                                  "--tensorboard-dir", f"{root}/tensorboard"])
        self.seconds["cascade"] = round(time.time() - t0, 1)
        records = _records(log)
        evals = [r for r in records if "heldout/reverse_kl" in r]
        steps = [r for r in records if "opd_loss" in r]
        out = []
        for i, p in enumerate(phases):
            start, end = (ends[i - 1] if i else 0), ends[i]
            mine = [r for r in evals if r["heldout/phase"] == i + 1]
            before = next(r for r in mine if r["step"] == start)
            after = next(r for r in mine if r["step"] == end)
            out.append({"name": p.get("name", f"phase{i + 1}"), "teacher": p["teacher"],
                        "steps": end - start,
                        "heldout_rkl_before": before["heldout/reverse_kl"],
                        "heldout_rkl_after": after["heldout/reverse_kl"],
                        "heldout_assistant_loss_before": before[SFT_VALID],
                        "heldout_assistant_loss_after": after[SFT_VALID]})
        timing = {k: sum(r[f"time/{k}_sec"] for r in steps) / max(len(steps), 1)
                  for k in ("rollout", "teacher", "train")}
        return out, timing


def run(args) -> int:
    demo = Demo(args)
    t0 = time.time()
    teachers = dict(zip(TEACHERS, map(os.path.abspath, args.teachers or ())))
    for name in TEACHERS:
        if name in teachers:
            continue
        layers, pretrain, sft = getattr(args, f"teacher_{name.lower()}")
        print(f"\n== teacher {name}: tiny-dense, {layers} layers, {pretrain} pre-training + {sft} "
              "SFT steps", flush=True)
        teachers[name] = demo.teacher(name, layers, pretrain, sft)
    losses = {"student": demo.assistant_loss(args.student, "student")}
    for name, ckpt in teachers.items():
        losses[name] = demo.assistant_loss(ckpt, f"teacher_{name}")
    print(f"\n== held-out assistant loss: student {losses['student']:.4f}, teacher A "
          f"{losses['A']:.4f}, teacher B {losses['B']:.4f}", flush=True)
    if not losses["B"] < losses["A"] < losses["student"]:
        raise MarcoError(f"the teachers are not stronger than the student in order (held-out "
                         f"assistant loss: student {losses['student']:.4f}, A {losses['A']:.4f}, "
                         f"B {losses['B']:.4f}; need B < A < student): not distilling (train the "
                         "teachers longer: --teachers or --teacher-a / --teacher-b)")
    print("\n== cascade: A, then B", flush=True)
    phases, timing = demo.cascade(teachers)
    names = {"A": phases[0]["name"], "B": phases[1]["name"]} if len(phases) == 2 else {}
    summary = {
        "opd_phases": phases,
        "teacher_heldout_assistant_loss": {names.get(k, k): losses[k] for k in ("A", "B")},
        "student_heldout_assistant_loss": losses["student"],
        "opd_step_seconds": {k: round(v, 3) for k, v in timing.items()},
        "opd_demo_seconds": {**demo.seconds, "total": round(time.time() - t0, 1)},
    }
    for p in phases:
        p["teacher"] = os.path.relpath(p["teacher"].replace("${MARCO_OPD_TEACHER_A}", teachers["A"])
                                       .replace("${MARCO_OPD_TEACHER_B}", teachers["B"]), demo.out)
    path = args.json or os.path.join(demo.out, "summary.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, path)
    for p in phases:
        print(f"  phase {p['name']}: held-out reverse KL to its teacher {p['heldout_rkl_before']:.4f} "
              f"-> {p['heldout_rkl_after']:.4f}, assistant loss {p['heldout_assistant_loss_before']:.4f}"
              f" -> {p['heldout_assistant_loss_after']:.4f}")
    print(f"  OPD step (mean): rollout {timing['rollout']:.2f} s, teacher scoring "
          f"{timing['teacher']:.2f} s, training {timing['train']:.2f} s; wrote {path}")
    return 0


def main(argv=None) -> int:
    return run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
