#!/usr/bin/env python3
"""Evaluate a Megatron checkpoint (any saved layout) or an exported HF directory with
EleutherAI's lm-evaluation-harness; write its results and our summary.

    python tools/evaluate.py --load runs/quickstart/moe/ckpt --suite bundled --out runs/eval/moe
    python tools/evaluate.py --hf-dir runs/quickstart/moe/hf --tasks marco_continuation_en,xnli_de \\
        --num-fewshot 0 --limit 100 --out runs/eval/moe_hf
    python tools/evaluate.py --load /ckpt/mini --suite multilingual --batch-size 32 --dtype bf16 \\
        --out eval/mini

--load evaluates with our Megatron model (lm-eval model "marco", megatron_ext/evaluation/lm.py);
--hf-dir with lm-eval's own `hf` model. Both give the same scores on the same checkpoint. Tasks:
lm-eval task or group names (--tasks, comma-separated) and/or a suite (--suite NAME: a file in
configs/eval/, or a path) that names tasks with their few-shot counts; the bundled offline tasks
(marco_continuation_<lang>, marco_manqa_<lang>, groups marco_continuation / marco_manqa) are made
from data/corpus on first use. When every task is local the tool runs offline
(HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1). --out receives results.json (lm-eval's results:
results[task][metric], e.g. "acc,none"; our settings record under "marco"), summary.md
(tables per group and per language), summary.json and a bar chart per group; all or nothing.
See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_ext.cli import (  # noqa: E402
    UsageError,
    add_expert_backend_flag,
    atomic_directory,
    fail,
    quiet_imports,
    tool_parser,
)
from megatron_ext.errors import MarcoError  # noqa: E402
from megatron_ext.evaluation import harness  # noqa: E402
from megatron_ext.evaluation.harness import Plan  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="Megatron checkpoint root (latest iteration) or iter_N directory")
    src.add_argument("--hf-dir", help="exported Hugging Face directory (lm-eval's `hf` model)")
    p.add_argument("--tasks", default="", help="lm-eval task/group names, comma-separated")
    p.add_argument("--suite", help="a suite in configs/eval (by name) or a suite file")
    p.add_argument("--include-path", action="append", default=[],
                   help="folder of lm-eval task YAMLs (as lm-eval's --include_path); repeatable. "
                   "Runs the Python its YAMLs name with !function: trusted folders only")
    p.add_argument("--num-fewshot", type=int, help="few-shot count for every task (overrides the suite)")
    p.add_argument("--limit", type=float, help="at most this many examples per task (<1: a fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="model weights' precision (on GPUs too: pass bf16 there)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render prompts with the chat template (ChatML; Instruct models)")
    p.add_argument("--system-instruction", help="system message (with --apply-chat-template)")
    p.add_argument("--tokenizer-type", choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"],
                   help="with --load: instead of the tokenizer the checkpoint records")
    p.add_argument("--tokenizer-model", help="with --load: .model file or HF tokenizer directory")
    p.add_argument("--max-length", type=int, help="context length (default: the model's)")
    add_expert_backend_flag(p, "with --load: ")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="lm-eval's stderr bootstrap")
    p.add_argument("--seed", type=int, default=0, help="lm-eval's random/numpy/torch/few-shot seed")
    p.add_argument("--task-cache", help="where the bundled tasks are generated "
                   "(default $MARCO_EVAL_CACHE or ~/.cache/marco-megatron/eval_tasks)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def check_source(args) -> None:
    if args.load and not os.path.isdir(args.load):
        raise UsageError(f"--load {args.load}: no such checkpoint directory")
    if args.hf_dir and not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
        raise UsageError(f"--hf-dir {args.hf_dir}: not a Hugging Face model directory (no config.json)")
    if args.hf_dir and (args.tokenizer_model or args.tokenizer_type):
        raise UsageError("--tokenizer-type/--tokenizer-model go with --load; --hf-dir uses its own tokenizer")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and not (0 < args.limit < 1 or float(args.limit).is_integer()
                                       and args.limit >= 1):
        raise UsageError(f"--limit must be a whole number of examples >= 1 or a fraction in (0, 1), "
                         f"got {args.limit:g}")
    if args.max_length is not None and args.max_length < 1:
        raise UsageError(f"--max-length must be >= 1, got {args.max_length}")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {args.out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists and is not empty; pass --overwrite to replace it")


# ------------------------------------------------------------------------------ running
def build_model(args):
    if args.load:
        from megatron_ext.evaluation.lm import MarcoLM

        return MarcoLM(load=args.load, dtype=args.dtype, batch_size=args.batch_size,
                       max_length=args.max_length, tokenizer_type=args.tokenizer_type,
                       tokenizer_model=args.tokenizer_model, seed=args.seed,
                       expert_backend=args.moe_expert_backend)
    import torch
    from lm_eval.models.huggingface import HFLM

    kwargs = {"max_length": args.max_length} if args.max_length else {}
    return HFLM(pretrained=os.path.abspath(args.hf_dir), batch_size=args.batch_size,
                dtype={"fp32": "float32", "bf16": "bfloat16"}[args.dtype],
                device="cuda" if torch.cuda.is_available() else "cpu", **kwargs)


def fewshot_batches(plan: Plan, override) -> dict:
    """few-shot count (None: the task's own) -> tasks; lm-eval takes one count per call."""
    batches: dict = {}
    for task in plan.tasks:
        entry = plan.entries.get(task)
        shots = override if override is not None else (entry.num_fewshot if entry else None)
        batches.setdefault(shots, []).append(task)
    return batches


def evaluate(args, plan: Plan, lm, tm) -> dict:
    from lm_eval import simple_evaluate

    merged: dict = {}
    for shots, names in fewshot_batches(plan, args.num_fewshot).items():
        res = simple_evaluate(
            model=lm, tasks=names, num_fewshot=shots, batch_size=args.batch_size, limit=args.limit,
            task_manager=tm, log_samples=False, apply_chat_template=args.apply_chat_template,
            system_instruction=args.system_instruction, fewshot_as_multiturn=True,
            bootstrap_iters=args.bootstrap_iters,
            random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
            fewshot_random_seed=args.seed)
        if not merged:
            merged = res
            continue
        for key in ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                    "n-samples"):
            merged.setdefault(key, {}).update(res.get(key, {}))
    return merged


def settings_record(args, plan: Plan, lm, results: dict) -> dict:
    import lm_eval

    from megatron_ext.evaluation.summary import task_settings

    info = getattr(lm, "settings", {}) or {}
    return {
        "model": "marco" if args.load else "hf",
        "checkpoint": info.get("checkpoint"), "step": info.get("step"), "preset": info.get("preset"),
        "hf_dir": os.path.abspath(args.hf_dir) if args.hf_dir else None,
        "tokenizer": info.get("tokenizer"),
        "dtype": args.dtype, "batch_size": args.batch_size, "max_length": lm.max_length,
        "moe_expert_backend": args.moe_expert_backend if args.load else None,
        "apply_chat_template": bool(args.apply_chat_template),
        "chat_template": lm.chat_template(True) if args.apply_chat_template else None,
        "system_instruction": args.system_instruction,
        "fewshot_as_multiturn": True if args.apply_chat_template else None,
        "num_fewshot_override": args.num_fewshot, "limit": args.limit, "seed": args.seed,
        "bootstrap_iters": args.bootstrap_iters,
        "suite": plan.suite, "include_paths": plan.include_paths, "offline": plan.local,
        "lm_eval_version": lm_eval.__version__,
        "tasks": task_settings(results),
        "command": ["tools/evaluate.py", *sys.argv[1:]],
    }


def write_outputs(tmp: str, results: dict, plan: Plan, settings: dict) -> list[dict]:
    from lm_eval.utils import handle_non_serializable

    from megatron_ext.evaluation.summary import write_summary

    results = dict(results, marco=settings)
    with open(os.path.join(tmp, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
    return write_summary(tmp, results, plan.entries, settings)


def main(argv=None) -> int:
    quiet_imports()
    args = build_parser().parse_args(argv)
    lm = None
    try:
        check_source(args)
        plan = harness.plan_tasks(args.tasks, args.suite, args.include_path, args.task_cache)
        harness.set_offline(plan)
        tm = harness.task_manager(plan)
        lm = build_model(args)
        try:
            results = evaluate(args, plan, lm, tm)
        except OSError as e:  # a task's data that cannot be read (the write comes after)
            return fail(f"reading the tasks' data failed ({e}); nothing written to --out")
        settings = settings_record(args, plan, lm, results)
        with atomic_directory(os.path.abspath(args.out), "eval") as tmp:
            rows = write_outputs(tmp, results, plan, settings)
        for r in rows:
            print(f"{r['task']:<32} {r['metric']:<12} {r['value']:.4f}", flush=True)
        print(f"wrote {os.path.abspath(args.out)}: results.json, summary.md, summary.json, "
              f"{len({r['group'] for r in rows})} chart(s)", flush=True)
        return 0
    except MarcoError as e:
        return fail(str(e))
    except OSError as e:
        return fail(f"writing --out {args.out} failed, nothing written: {e}")
    finally:
        if lm is not None and hasattr(lm, "close"):
            lm.close()


if __name__ == "__main__":
    sys.exit(main())
