#!/usr/bin/env python3
"""Build the bundled multilingual SFT sample (data/sft/) from the bundled man-page corpus.

Real text in 19 languages, asked and answered in each page's own language. From every page of
data/corpus (train and valid) with a NAME line "name - description":

- "What does the command X do?" (sections 1, 6, 8; "the function X" for 2 and 3, "what is the
  manual page X about" otherwise) -> the page's NAME line, verbatim;
- "Show the synopsis of X." -> its SYNOPSIS section (when the page has one of at most
  --max-synopsis-chars characters);
- a multi-turn conversation: a system turn, then both questions and answers.

Questions and the system prompt come from the per-language templates of data/sft/templates.json
(the synopsis question names the section as that language's pages head it, e.g. ÜBERSICHT,
SAMENVATTING).
The held-out split is by command: a command whose sha1 falls in the lowest --valid-share of
the hash range is held out in every language (plus, for a language that would otherwise have
no held-out conversation, its lowest-hash command), so held-out commands are unseen in
training. Deterministic: the same corpus gives the same bytes (gzip without timestamps).

    python tools/make_sft_sample.py            # writes data/sft/{train,valid}.jsonl.gz, manifest.json
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere
from megatron_ext.data.jsonl import gz_jsonl  # noqa: E402

CORPUS = ROOT / "data" / "corpus"

# Per language: the questions ("command", "function", "page", "synopsis"; {x} is the name), the
# "system" prompt, and the "synopsis_headings" its pages head the SYNOPSIS section with
# (upper-cased, words of the heading line).
TEMPLATES = json.loads((ROOT / "data" / "sft" / "templates.json").read_text(encoding="utf-8"))
COMMAND_SECTIONS, FUNCTION_SECTIONS = {"1", "6", "8"}, {"2", "3"}
_NAME_RE = re.compile(r"^\s*(?P<names>[\w.:+\[\]-]+(?:\s*,\s*[\w.:+\[\]-]+)*)\s+[-—–]\s+(?P<desc>\S.*)$")
_SECTION_RE = re.compile(r"/man(\w)/")


def fail(msg: str) -> None:
    print(f"error: make_sft_sample: {msg}", file=sys.stderr)
    sys.exit(2)


def heading_words(line: str) -> set[str]:
    """The SYNOPSIS-like names a heading line carries: 'SYNOPSIS 总览', '总览 (SYNOPSIS)' ..."""
    line = line.strip()
    parts = {line.upper()} | {p.upper() for p in re.split(r"[\s()（）]+", line) if p}
    return parts


def parse_page(text: str, lang: str, max_synopsis: int):
    """(names, NAME line, synopsis or None) of a rendered page, or None without a NAME line."""
    blocks = text.split("\n\n")
    name_line = None
    for line in blocks[0].split("\n")[:3]:
        if _NAME_RE.match(line):
            name_line = line.strip()
            break
    if name_line is None:
        return None
    names = [n.strip() for n in _NAME_RE.match(name_line)["names"].split(",")]
    synopsis = None
    for k, block in enumerate(blocks[1:4], 1):
        head, _, rest = block.partition("\n")
        if heading_words(head) & set(TEMPLATES[lang]["synopsis_headings"]) and rest.strip():
            parts = [rest.rstrip()]
            for nxt in blocks[k + 1:]:  # continuation blocks start with the name or an #include
                first = nxt.lstrip()
                if any(first.startswith(n) for n in names) or first.startswith("#include"):
                    parts.append(nxt.rstrip())
                else:
                    break
            synopsis = "\n\n".join(parts)
            if len(synopsis) > max_synopsis:
                synopsis = None
            break
    return names, name_line, synopsis


def conversations(lang: str, page: dict, max_synopsis: int) -> list[dict]:
    parsed = parse_page(page["text"], lang, max_synopsis)
    if parsed is None:
        return []
    names, name_line, synopsis = parsed
    x = names[0]
    m = _SECTION_RE.search(page["source"])
    section = m.group(1) if m else ""
    t = TEMPLATES[lang]
    ask = "command" if section in COMMAND_SECTIONS else "function" if section in FUNCTION_SECTIONS else "page"
    q1, a1 = t[ask].format(x=x), name_line
    meta = {"lang": lang, "command": x, "source": page["source"]}
    out = [{"messages": [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}],
            "kind": "name", **meta}]
    if synopsis:
        q2 = t["synopsis"].format(x=x)
        out.append({"messages": [{"role": "user", "content": q2},
                                 {"role": "assistant", "content": synopsis}], "kind": "synopsis", **meta})
        out.append({"messages": [{"role": "system", "content": t["system"]},
                                 {"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                                 {"role": "user", "content": q2},
                                 {"role": "assistant", "content": synopsis}], "kind": "multi_turn", **meta})
    return out


def command_hash(command: str) -> float:
    return int(hashlib.sha1(command.lower().encode()).hexdigest()[:12], 16) / 16 ** 12


def build(max_synopsis: int, valid_share: float) -> tuple[dict[str, list[dict]], dict]:
    manifest = json.loads((CORPUS / "manifest.json").read_text())
    by_lang: dict[str, list[dict]] = {}
    for lang in sorted(manifest["languages"]):
        if lang not in TEMPLATES:
            fail(f"no question templates for language '{lang}' of {CORPUS}/manifest.json in "
                 "data/sft/templates.json")
        seen, convs = set(), []
        for split in ("train", "valid"):
            with gzip.open(CORPUS / f"{lang}.{split}.jsonl.gz", "rt", encoding="utf-8") as fh:
                for line in fh:
                    for c in conversations(lang, json.loads(line), max_synopsis):
                        key = json.dumps(c["messages"], ensure_ascii=False)
                        if key not in seen:
                            seen.add(key)
                            convs.append(c)
        by_lang[lang] = convs
    commands = {c["command"].lower() for convs in by_lang.values() for c in convs}
    held = {cmd for cmd in commands if command_hash(cmd) < valid_share}
    for convs in by_lang.values():  # every language gets a held-out command
        own = sorted({c["command"].lower() for c in convs}, key=command_hash)
        if own and not held & set(own):
            held.add(own[0])
    splits = {"train": [], "valid": []}
    counts: dict = defaultdict(lambda: {"train": Counter(), "valid": Counter()})
    for lang, convs in by_lang.items():
        for c in convs:
            split = "valid" if c["command"].lower() in held else "train"
            splits[split].append(c)
            counts[lang][split][c["kind"]] += 1
    info = {
        "source": "data/corpus (Debian 12 manual pages), see data/corpus/README.md",
        "corpus_manifest_sha256": hashlib.sha256((CORPUS / "manifest.json").read_bytes()).hexdigest(),
        "max_synopsis_chars": max_synopsis, "valid_share": valid_share,
        "held_out_commands": len(held), "commands": len(commands),
        "languages": {lang: {s: {"conversations": sum(counts[lang][s].values()), **dict(sorted(
            counts[lang][s].items()))} for s in ("train", "valid")} for lang in sorted(counts)},
        "conversations": {s: len(v) for s, v in splits.items()},
    }
    return splits, info


def main(argv=None) -> None:
    from megatron_ext.cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--output-dir", default=str(ROOT / "data" / "sft"),
                   help="where the per-language chat jsonl files go")
    p.add_argument("--max-synopsis-chars", type=int, default=400,
                   help="longer SYNOPSIS sections are not asked for")
    p.add_argument("--valid-share", type=float, default=0.1,
                   help="share of commands (by hash) held out in every language")
    args = p.parse_args(argv)
    if not (CORPUS / "manifest.json").is_file():
        fail(f"{CORPUS}/manifest.json is missing")
    splits, info = build(args.max_synopsis_chars, args.valid_share)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        data = gz_jsonl(records)
        info[f"{split}_sha256"] = hashlib.sha256(data).hexdigest()
        info[f"{split}_bytes"] = len(data)
        tmp = out / f".{split}.jsonl.gz.tmp-{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, out / f"{split}.jsonl.gz")
    (out / "manifest.json").write_text(json.dumps(info, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"wrote {out}: {info['conversations']['train']} train, {info['conversations']['valid']} valid "
          f"conversations in {len(info['languages'])} languages ({info['held_out_commands']} of "
          f"{info['commands']} commands held out)")


if __name__ == "__main__":
    main()
