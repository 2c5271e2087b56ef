#!/usr/bin/env python3
"""Write the bundled offline evaluation tasks (lm-eval YAML + local JSON lines) into a folder.

    python tools/make_eval_tasks.py --out runs/eval_tasks
    python tools/evaluate.py --load CKPT --include-path runs/eval_tasks --tasks marco_continuation --out ...

tools/evaluate.py does this by itself on first use (into $MARCO_EVAL_CACHE, default
~/.cache/marco-megatron/eval_tasks/<hash>); this tool is for looking at the tasks or for
another lm-eval front end (`lm_eval --include_path DIR`). The YAMLs name their data by
absolute path. Deterministic. The recipe: megatron_ext/evaluation/tasks.py, docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_ext.cli import (  # noqa: E402
    HelpFormatter,
    UsageError,
    atomic_directory,
    fail,
    require_empty_output,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--per-language", type=int, default=24, help="multiple-choice examples per language")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    from megatron_ext.evaluation import tasks

    out = os.path.abspath(args.out)
    try:
        require_empty_output(out, "--out", args.overwrite)
        if args.per_language < 1:
            raise UsageError(f"--per-language {args.per_language} must be >= 1")
        with atomic_directory(out, "tasks") as tmp:
            counts = tasks.write_bundled_tasks(tmp, per_language=args.per_language)
            for name in os.listdir(tmp):  # the YAMLs name their data where it will be
                if name.endswith(".yaml"):
                    path = os.path.join(tmp, name)
                    text = open(path, encoding="utf-8").read().replace(tmp, out)
                    open(path, "w", encoding="utf-8").write(text)
    except UsageError as e:
        return fail(str(e))
    for name, n in sorted(counts.items()):
        print(f"{name:<28} {n:>4} examples")
    print(f"wrote {out}: {len(counts)} tasks and the groups marco_continuation, marco_manqa")
    return 0


if __name__ == "__main__":
    sys.exit(main())
