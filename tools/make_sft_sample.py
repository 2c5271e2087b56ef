#!/usr/bin/env python3
"""Build the bundled multilingual SFT sample (data/sft/) from the bundled man-page corpus.

Real text in 19 languages, asked and answered in each page's own language. From every page of
data/corpus (train and valid) with a NAME line "name - description":

- "What does the command X do?" (sections 1, 6, 8; "the function X" for 2 and 3, "what is the
  manual page X about" otherwise) -> the page's NAME line, verbatim;
- "Show the synopsis of X." -> its SYNOPSIS section (when the page has one of at most
  --max-synopsis-chars characters);
- a multi-turn conversation: a system turn, then both questions and answers.

Questions and the system prompt come from the per-language templates below (the synopsis
question names the section as that language's pages head it, e.g. ÜBERSICHT, SAMENVATTING).
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
import io
import json
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus"

# lang: (command question, function question, other-page question, synopsis request, system)
TEMPLATES = {
    "cs": ("Co dělá příkaz {x}?", "Co dělá funkce {x}?", "O čem je manuálová stránka {x}?",
           "Ukaž použití {x}.",
           "Jsi užitečný asistent, který odpovídá na otázky o manuálových stránkách Linuxu."),
    "de": ("Was macht der Befehl {x}?", "Was macht die Funktion {x}?",
           "Worum geht es in der Handbuchseite {x}?", "Zeige die Übersicht von {x}.",
           "Du bist ein hilfreicher Assistent, der Fragen zu Linux-Handbuchseiten beantwortet."),
    "el": ("Τι κάνει η εντολή {x};", "Τι κάνει η συνάρτηση {x};",
           "Τι περιγράφει η σελίδα εγχειριδίου {x};", "Δείξε τη σύνοψη του {x}.",
           "Είσαι ένας εξυπηρετικός βοηθός που απαντά σε ερωτήσεις για τις σελίδες εγχειριδίου "
           "του Linux."),
    "en": ("What does the command {x} do?", "What does the function {x} do?",
           "What is the manual page {x} about?", "Show the synopsis of {x}.",
           "You are a helpful assistant that answers questions about Linux manual pages."),
    "es": ("¿Qué hace el comando {x}?", "¿Qué hace la función {x}?",
           "¿De qué trata la página de manual {x}?", "Muestra la sinopsis de {x}.",
           "Eres un asistente útil que responde preguntas sobre las páginas de manual de Linux."),
    "fr": ("Que fait la commande {x} ?", "Que fait la fonction {x} ?",
           "De quoi parle la page de manuel {x} ?", "Montre le synopsis de {x}.",
           "Tu es un assistant serviable qui répond aux questions sur les pages de manuel Linux."),
    "hu": ("Mit csinál a(z) {x} parancs?", "Mit csinál a(z) {x} függvény?",
           "Miről szól a(z) {x} kézikönyvoldal?", "Mutasd meg a(z) {x} összegzését.",
           "Segítőkész asszisztens vagy, aki a Linux kézikönyvoldalaival kapcsolatos kérdésekre "
           "válaszol."),
    "id": ("Apa yang dilakukan perintah {x}?", "Apa yang dilakukan fungsi {x}?",
           "Tentang apa halaman manual {x}?", "Tampilkan ringkasan {x}.",
           "Anda adalah asisten yang membantu menjawab pertanyaan tentang halaman manual Linux."),
    "it": ("Che cosa fa il comando {x}?", "Che cosa fa la funzione {x}?",
           "Di che cosa tratta la pagina di manuale {x}?", "Mostra la sintassi di {x}.",
           "Sei un assistente disponibile che risponde a domande sulle pagine di manuale di Linux."),
    "ja": ("{x} コマンドは何をしますか？", "{x} 関数は何をしますか？",
           "マニュアルページ {x} は何について書かれていますか？", "{x} の書式を見せてください。",
           "あなたは Linux のマニュアルページについての質問に答える親切なアシスタントです。"),
    "nl": ("Wat doet het commando {x}?", "Wat doet de functie {x}?",
           "Waar gaat de handleidingpagina {x} over?", "Toon de samenvatting van {x}.",
           "Je bent een behulpzame assistent die vragen over Linux-handleidingpagina's beantwoordt."),
    "pl": ("Co robi polecenie {x}?", "Co robi funkcja {x}?", "Czego dotyczy strona podręcznika {x}?",
           "Pokaż składnię {x}.",
           "Jesteś pomocnym asystentem, który odpowiada na pytania o strony podręcznika systemu Linux."),
    "pt": ("O que faz o comando {x}?", "O que faz a função {x}?",
           "Do que trata a página de manual {x}?", "Mostre a sinopse de {x}.",
           "Você é um assistente prestativo que responde a perguntas sobre as páginas de manual do "
           "Linux."),
    "ro": ("Ce face comanda {x}?", "Ce face funcția {x}?", "Despre ce este pagina de manual {x}?",
           "Arată rezumatul pentru {x}.",
           "Ești un asistent util care răspunde la întrebări despre paginile de manual Linux."),
    "ru": ("Что делает команда {x}?", "Что делает функция {x}?", "О чём страница руководства {x}?",
           "Покажи синтаксис {x}.",
           "Ты полезный помощник, который отвечает на вопросы о страницах руководства Linux."),
    "tr": ("{x} komutu ne yapar?", "{x} işlevi ne yapar?", "{x} kılavuz sayfası ne hakkındadır?",
           "{x} için kullanım özetini göster.",
           "Linux kılavuz sayfaları hakkındaki soruları yanıtlayan yardımsever bir asistansın."),
    "uk": ("Що робить команда {x}?", "Що робить функція {x}?", "Про що сторінка довідника {x}?",
           "Покажи короткий опис {x}.",
           "Ти корисний помічник, який відповідає на запитання про сторінки довідника Linux."),
    "vi": ("Lệnh {x} dùng để làm gì?", "Hàm {x} dùng để làm gì?",
           "Trang hướng dẫn {x} nói về điều gì?", "Hiển thị phần tóm tắt của {x}.",
           "Bạn là một trợ lý hữu ích, trả lời các câu hỏi về các trang hướng dẫn của Linux."),
    "zh": ("{x} 命令是做什么的？", "{x} 函数是做什么的？", "手册页 {x} 讲的是什么？",
           "请给出 {x} 的用法概要。", "你是一个乐于助人的助手，负责回答关于 Linux 手册页的问题。"),
}
# How each language's pages head the SYNOPSIS section (upper-cased, words of the heading line).
SYNOPSIS_HEADINGS = {
    "cs": {"POUŽITÍ", "PŘEHLED"}, "de": {"ÜBERSICHT"}, "el": {"ΣΦΑΙΡΙΚΗ ΕΙΚΟΝΑ", "ΣΥΝΟΨΗ"},
    "en": {"SYNOPSIS"}, "es": {"SINOPSIS"}, "fr": {"SYNOPSIS"}, "hu": {"ÖSSZEGZÉS", "ÁTTEKINTÉS"},
    "id": {"RINGKASAN"}, "it": {"SINTASSI"}, "ja": {"書式"}, "nl": {"SAMENVATTING"},
    "pl": {"SKŁADNIA"}, "pt": {"SINOPSE"}, "ro": {"REZUMAT"}, "ru": {"СИНТАКСИС", "ОБЗОР"},
    "tr": {"KULLANIM"}, "uk": {"КОРОТКИЙ ОПИС"}, "vi": {"TÓM TẮT"},
    "zh": {"SYNOPSIS", "总览", "概述", "概要"},
}
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
        if heading_words(head) & SYNOPSIS_HEADINGS[lang] and rest.strip():
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
    ask_cmd, ask_func, ask_page, ask_syn, system = TEMPLATES[lang]
    ask = ask_cmd if section in COMMAND_SECTIONS else ask_func if section in FUNCTION_SECTIONS else ask_page
    q1, a1 = ask.format(x=x), name_line
    meta = {"lang": lang, "command": x, "source": page["source"]}
    out = [{"messages": [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}],
            "kind": "name", **meta}]
    if synopsis:
        q2 = ask_syn.format(x=x)
        out.append({"messages": [{"role": "user", "content": q2},
                                 {"role": "assistant", "content": synopsis}], "kind": "synopsis", **meta})
        out.append({"messages": [{"role": "system", "content": system},
                                 {"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                                 {"role": "user", "content": q2},
                                 {"role": "assistant", "content": synopsis}], "kind": "multi_turn", **meta})
    return out


def command_hash(command: str) -> float:
    return int(hashlib.sha1(command.lower().encode()).hexdigest()[:12], 16) / 16 ** 12


def gz_jsonl(records: list[dict]) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode())
    return buf.getvalue()


def build(max_synopsis: int, valid_share: float) -> tuple[dict[str, list[dict]], dict]:
    manifest = json.loads((CORPUS / "manifest.json").read_text())
    by_lang: dict[str, list[dict]] = {}
    for lang in sorted(manifest["languages"]):
        if lang not in TEMPLATES:
            fail(f"no question templates for language '{lang}' of {CORPUS}/manifest.json")
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default=str(ROOT / "data" / "sft"))
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
