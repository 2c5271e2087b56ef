#!/usr/bin/env python3
"""Generate text with an exported Marco model, with plain `transformers` (no Megatron).

    python examples/generate.py --model runs/quickstart/moe/hf --langs en de fr zh ru ja

Prompts: --prompt TEXT (repeatable), else the opening of each language's first held-out
document of the bundled sample corpus (Debian manual pages, so expect man-page prose).
Sampling is seeded, so a run is reproducible. --json writes prompts and continuations.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from megatron_ext.cli import HelpFormatter, UsageError, run_tool  # noqa: E402

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "corpus")


def corpus_prompt(lang: str, chars: int = 40) -> str:
    """The first `chars` characters of the language's first held-out document, cut at a space."""
    path = os.path.join(CORPUS, f"{lang}.valid.jsonl.gz")
    if not os.path.isfile(path):
        raise UsageError(f"--langs {lang}: no {path}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"]
    cut = text[:chars]
    return cut[:cut.rfind(" ")] if " " in cut[chars // 2:] else cut


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face directory (with tokenizer)")
    p.add_argument("--langs", nargs="+", default=["en", "de", "fr", "es", "ru", "zh", "ja"],
                   help="languages whose held-out corpus text gives the prompts")
    p.add_argument("--prompt", action="append", help="a prompt (instead of corpus prompts)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", help="write [{lang, prompt, continuation}] here")
    return p


def run(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UsageError(f"--model {args.model}: no config.json (export a checkpoint with "
                         "tools/export_mcore_to_hf.py)")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = ([(None, t) for t in args.prompt] if args.prompt
               else [(lang, corpus_prompt(lang)) for lang in args.langs])
    results = []
    for lang, prompt in prompts:
        torch.manual_seed(args.seed)
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=True,
                                 temperature=args.temperature, top_p=0.9,
                                 repetition_penalty=1.2, pad_token_id=tokenizer.pad_token_id)
        new = out[0, enc["input_ids"].shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        results.append({"lang": lang, "prompt": prompt, "continuation": text,
                        "new_tokens": int(new.numel())})
        shown = (prompt + "⟨" + text + "⟩").replace("\n", "⏎ ")
        print(f"[{lang or '--'}] {shown}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, ensure_ascii=False, indent=1)
    return 0


def main(argv=None) -> int:
    return run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
