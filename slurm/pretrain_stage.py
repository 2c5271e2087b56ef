#!/usr/bin/env python3
"""pretrain_marco.py for one stage of a curriculum chain; what every launcher runs per rank.

    python slurm/pretrain_stage.py --stage 2 --start-from CKPT_ROOT [--weights-only]
        [--lr-schedule run|stage] [--plan] -- <pretrain_marco.py flags, with --curriculum and --save>

The trainer addresses data by global step, and a curriculum's stage boundaries are absolute
token counts of one run (megatron_ext/data/curriculum.py). So stage k of a chain is the same
run as stage k-1, continued: the same curriculum file and flags, `--train-iters` at stage k's
end boundary, `--load` of stage k-1's final checkpoint (model, optimizer, scheduler, RNG and
iteration). This wrapper fills in what depends on the stage, on every (re)start:

  --train-iters      ceil(end tokens of stage k / (global batch x sequence length)), unless given
  --load             the --save directory when it holds a complete checkpoint (its 'latest'
                     marker): the job was requeued and resumes itself. Otherwise --start-from,
                     whose 'latest' checkpoint must sit exactly at stage k's first step (the
                     previous stage finished; an upcycled start is iteration 0), with
                     --no-load-optim when --weights-only.
  --lr-decay-iters   --lr-schedule run: the end of the curriculum's last stage (one schedule
                     over the whole chain; with WSD, --lr-wsd-decay-iters = the last stage, so
                     the rate anneals during it). --lr-schedule stage: this stage's length (a
                     fresh schedule, for a weights-only start). Flags given explicitly win.

Before training, rank 0 writes the stage's final iteration to <save>/stage_final_iteration.txt;
slurm/launch.sh compares it with the 'latest' marker to decide whether to requeue the job.
`--plan` prints the resolved command as JSON and exits (no training, nothing written);
`--check` checks that what the stage reads exists: the checkpoint it starts from, the
--tokenizer-model, and every source and validation prefix of the curriculum (.bin and .idx),
naming each missing one (exit 2) before anything is queued; alone it prints the stage's steps
and the flags it adds (slurm/launch.sh's dry run), with --plan the JSON plan.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

LATEST_FILE = "latest_checkpointed_iteration.txt"  # megatron_ext.checkpointing.LATEST_FILE
FINAL_FILE = "stage_final_iteration.txt"


class StageError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    from megatron_ext.cli import RawDescriptionHelpFormatter

    p = argparse.ArgumentParser(
        prog="pretrain_stage.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=RawDescriptionHelpFormatter,
        usage="%(prog)s --stage N [--start-from DIR|none] [--weights-only] "
              "[--lr-schedule run|stage] [--plan] -- PRETRAIN_FLAGS...")
    p.add_argument("--stage", type=int, required=True, help="1-based stage of --curriculum")
    p.add_argument("--start-from", default="none",
                   help="checkpoint root this stage starts from when --save has no checkpoint "
                        "yet: the previous stage's --save directory, an upcycled checkpoint, or "
                        "'none' (random initialisation; first stage only)")
    p.add_argument("--weights-only", action="store_true",
                   help="start from --start-from's weights only (fresh optimizer and schedule)")
    p.add_argument("--lr-schedule", choices=["run", "stage"], default="run",
                   help="run: one LR schedule over the whole chain; stage: a fresh schedule over "
                        "this stage (for a weights-only start)")
    p.add_argument("--check", action="store_true",
                   help="check that the start checkpoint, the tokenizer and every data prefix "
                        "of the curriculum exist, each missing one named (exit 2); print the "
                        "stage's steps and added flags (with --plan: the JSON plan)")
    p.add_argument("--plan", action="store_true",
                   help="print the resolved stage (steps, what it loads, the pretrain_marco.py "
                        "command) as JSON and exit: nothing is trained or written")
    return p


def _flags_parser() -> argparse.ArgumentParser:
    """The pretrain_marco.py flags this wrapper reads (everything else passes through)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--preset", "--curriculum", "--save", "--load", "--lr-decay-style",
                 "--tokenizer-model"):
        p.add_argument(flag)
    for flag in ("--seq-length", "--global-batch-size", "--train-iters", "--lr-decay-iters",
                 "--lr-wsd-decay-iters"):
        p.add_argument(flag, type=int)
    return p


def read_latest(root: str) -> int | None:
    """Iteration named by root's 'latest' marker; None without one."""
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise StageError(f"{path} holds {text!r}, not an iteration")
    return int(text)


def stage_steps(flags: argparse.Namespace, stage: int) -> tuple[int, int, int, int]:
    """(first step, end step, last stage's first step, last stage's end step) of the stage."""
    from megatron_ext.data.curriculum import load_curriculum
    from megatron_ext.presets import get_preset

    cur = load_curriculum(flags.curriculum)
    if not 1 <= stage <= len(cur.stages):
        raise StageError(f"--stage {stage}: {flags.curriculum} has stages 1-{len(cur.stages)}")
    if flags.global_batch_size is None:
        raise StageError("--global-batch-size is required: stage boundaries are in tokens")
    seq = flags.seq_length or get_preset(flags.preset or "tiny").seq_length
    tokens_per_step = flags.global_batch_size * seq
    first, end = cur.stages[stage - 1].step_range(tokens_per_step)
    last_first, last_end = cur.stages[-1].step_range(tokens_per_step)
    return first, end, last_first, last_end


def schedule(opts: argparse.Namespace, flags: argparse.Namespace) -> tuple[int, int, int, list]:
    """(first step, stage end, --train-iters, the flags the stage adds: --train-iters and the
    LR decay) of the stage."""
    if not flags.save:
        raise StageError("the pretrain_marco.py flags need --save (the stage's checkpoint dir)")
    if flags.load:
        raise StageError("--load is chosen by pretrain_stage.py: give --start-from instead")
    if not flags.curriculum:
        raise StageError("--stage needs --curriculum (stage boundaries come from it)")
    first, end, last_first, last_end = stage_steps(flags, opts.stage)
    train_iters = flags.train_iters or end
    if train_iters <= first:
        raise StageError(f"--train-iters {train_iters} ends before stage {opts.stage} starts "
                         f"(step {first})")
    extra = [] if flags.train_iters else ["--train-iters", str(train_iters)]
    if flags.lr_decay_iters is None:
        if opts.lr_schedule == "run":
            extra += ["--lr-decay-iters", str(last_end)]
            if flags.lr_decay_style == "WSD" and flags.lr_wsd_decay_iters is None:
                extra += ["--lr-wsd-decay-iters", str(last_end - last_first)]
        else:
            extra += ["--lr-decay-iters", str(end - first)]
    return first, end, train_iters, extra


def resolve(opts: argparse.Namespace, argv: list[str]) -> dict:
    flags, _ = _flags_parser().parse_known_args(argv)
    first, end, train_iters, extra = schedule(opts, flags)
    own = read_latest(flags.save)
    if own is not None:
        action, load = f"resume from {flags.save} at iteration {own}", ["--load", flags.save]
    elif opts.start_from.lower() == "none":
        if first != 0:
            raise StageError(f"stage {opts.stage} starts at step {first}: it needs --start-from "
                             "(the previous stage's checkpoint directory)")
        action, load = "start from random initialisation", []
    else:
        at = read_latest(opts.start_from)
        if at is None:
            before = ("run tools/upcycle_hf_to_mcore.py --save " + opts.start_from
                      + " first (README: Marco-Nano on a Slurm cluster)" if first == 0
                      else "has the previous stage run?")
            raise StageError(f"--start-from {opts.start_from}: no complete checkpoint (no "
                             f"{LATEST_FILE}); {before}")
        if at != first:
            raise StageError(f"--start-from {opts.start_from}: its latest checkpoint is iteration "
                             f"{at}, but stage {opts.stage} starts at step {first}; the previous "
                             "stage has not finished (or was run with another batch size)")
        load = ["--load", opts.start_from] + (["--no-load-optim"] if opts.weights_only else [])
        action = (f"start from {opts.start_from} at iteration {at}"
                  + (" (weights only)" if opts.weights_only else ""))
    return {"stage": opts.stage, "first_step": first, "stage_end_step": end,
            "train_iters": train_iters, "action": action, "save": flags.save,
            "argv": [*argv, *extra, *load]}


def missing_inputs(opts: argparse.Namespace, argv: list[str]) -> list[str]:
    """--check: what the stage reads and is not there (one line each): the start checkpoint,
    the tokenizer, every source and validation prefix of the curriculum."""
    from megatron_ext.data.curriculum import SAMPLE_ROOT, load_curriculum

    flags, _ = _flags_parser().parse_known_args(argv)
    missing = []
    start = opts.start_from
    if start.lower() != "none" and read_latest(flags.save or "") is None and read_latest(start) is None:
        missing.append(f"--start-from {start}: no complete checkpoint (no {LATEST_FILE})")
    if flags.tokenizer_model and not os.path.exists(flags.tokenizer_model):
        missing.append(f"--tokenizer-model {flags.tokenizer_model}: no such file or directory")
    cur = load_curriculum(flags.curriculum)
    if cur.data_root == SAMPLE_ROOT:
        return missing  # the bundled corpus, prepared by the trainer
    prefixes = {f"source {s.name}": cur.resolve(s.prefix) for s in cur.sources.values()}
    prefixes.update({f"validation {n}": cur.resolve(p) for n, p in cur.validation.items()})
    for what, prefix in prefixes.items():
        absent = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if absent:
            missing.append(f"{flags.curriculum}: {what}: {prefix}{'/'.join(absent)} not found")
    return missing


def check(opts: argparse.Namespace, argv: list[str], rank: int) -> int:
    """--check without --plan (slurm/launch.sh's dry run): the stage's steps and the flags it
    adds, then each missing input; exit 2 if any."""
    flags, _ = _flags_parser().parse_known_args(argv)
    try:
        first, end, train_iters, extra = schedule(opts, flags)
    except (StageError, ValueError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        problems = missing_inputs(opts, argv)
        action = None if problems else resolve(opts, argv)["action"]
    except (StageError, ValueError) as e:
        problems, action = [str(e)], None
    if rank == 0:
        print(f"stage {opts.stage}: steps {first} -> {train_iters} (stage ends at {end}); "
              f"pretrain_marco.py gets {' '.join(extra) or 'no added flags'}"
              + (f"; {action}" if action else ""), flush=True)
        for line in problems:
            print(f"error: {line}", file=sys.stderr, flush=True)
    return 2 if problems else 0


def _write_final(save: str, iteration: int) -> None:
    os.makedirs(save, exist_ok=True)
    path = os.path.join(save, FINAL_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(iteration))
    os.replace(tmp, path)


def main(args: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if args is None else args)
    if "--" not in args:
        build_parser().parse_args(args)  # --help prints the help and exits 0; a bad flag is named
        build_parser().error("separate the pretrain_marco.py flags with --")
    split = args.index("--")
    opts = build_parser().parse_args(args[:split])
    rank = int(os.environ.get("RANK", "0"))
    if opts.check and not opts.plan:
        return check(opts, args[split + 1:], rank)
    try:
        problems = missing_inputs(opts, args[split + 1:]) if opts.check else []
        plan = None if problems else resolve(opts, args[split + 1:])
    except (StageError, ValueError) as e:  # DataConfigError is a ValueError
        problems = [str(e)]
    if problems:
        if rank == 0:
            for line in problems:
                print(f"error: {line}", file=sys.stderr, flush=True)
            if len(problems) > 1:
                print(f"error: {len(problems)} inputs of stage {opts.stage} are missing",
                      file=sys.stderr, flush=True)
        return 2
    if opts.plan:
        print(json.dumps(plan))
        return 0
    if rank == 0:
        _write_final(plan["save"], plan["train_iters"])
        print(f"stage {opts.stage}: steps {plan['first_step']} -> {plan['train_iters']} "
              f"(stage ends at {plan['stage_end_step']}); {plan['action']}", flush=True)
    import pretrain_marco
    from megatron_ext.cli import entry_point

    # As `python pretrain_marco.py ...` runs: logging set up, MarcoError -> one line, exit 2.
    return entry_point(pretrain_marco.main, plan["argv"])


if __name__ == "__main__":  # checkpoint writers spawn processes that re-import this file
    sys.exit(main())
