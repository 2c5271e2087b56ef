#!/usr/bin/env python3
"""Train the SentencePiece BPE tokenizer (byte fallback) for the tiny presets.

Trained on the `text` of JSON-lines files (default: the bundled corpus' train splits).
Special ids are fixed: <unk>=0, <s>=1 (BOS), </s>=2 (EOS, used as Megatron's EOD), <pad>=3.
Identity normalisation, no dummy prefix, whitespace kept and "\\n" as its own piece, so
detokenize(tokenize(text)) == text for any UTF-8 text (byte fallback covers unseen characters).
Deterministic given the same inputs (single-threaded, all sentences, fixed order).

    python tools/train_tokenizer.py --vocab-size 8192 --output-prefix data/tokenizer/marco_tiny_spm
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere

from megatron_ext.cli import HelpFormatter, UsageError, run_tool  # noqa: E402
from megatron_ext.errors import DataConfigError  # noqa: E402

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def write_all(files: dict[Path, bytes]) -> None:
    """Every file to a temporary name first, then all renamed: a failed write (disk full)
    leaves none of them, and no old file is replaced."""
    tmps = {path: path.with_name(f".{path.name}.tmp-{os.getpid()}") for path in files}
    try:
        for path, data in files.items():
            tmps[path].write_bytes(data)
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def iter_texts(paths: list[str], key: str):
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        try:
            fh = opener(path, "rt", encoding="utf-8")
        except OSError as e:
            raise DataConfigError(f"--input {path}: cannot open ({e.strerror or e})") from None
        with fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[key]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataConfigError(f"{path}:{n}: expected a JSON object with a string "
                                          f"'{key}'") from None
                yield text


def sentences(paths: list[str], key: str, max_bytes: int):
    """Paragraphs (kept with their inner newlines) as SentencePiece's training 'sentences'."""
    for text in iter_texts(paths, key):
        for para in text.split("\n\n"):
            if para and len(para.encode()) <= max_bytes:
                yield para


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+", default=None,
                   help="JSON-lines files (.jsonl or .jsonl.gz); default data/corpus/*.train.jsonl.gz")
    p.add_argument("--json-keys", default="text", help="key of the text field")
    p.add_argument("--vocab-size", type=int, default=8192, help="SentencePiece vocabulary size")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters the vocabulary covers (SentencePiece)")
    p.add_argument("--output-prefix", default=str(ROOT / "data" / "tokenizer" / "marco_tiny_spm"),
                   help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--chat-tokens", action=argparse.BooleanOptionalAction, default=True,
                   help="then give the model the ChatML tokens <|im_start|>/<|im_end|> "
                        "(tools/add_chat_tokens.py: two pieces the bundled corpus never uses; "
                        "no corpus id changes), as the shipped tokenizer has them")
    return p


def run(args) -> int:
    try:
        import sentencepiece as spm
    except ImportError:
        raise UsageError("the 'sentencepiece' package is not installed "
                         "(pip install -r requirements/cpu.txt)") from None

    inputs = args.input or sorted(str(f) for f in (ROOT / "data" / "corpus").glob("*.train.jsonl.gz"))
    if not inputs:
        raise UsageError("no --input files (and no data/corpus/*.train.jsonl.gz)")
    if args.vocab_size < 300:
        raise UsageError(f"--vocab-size {args.vocab_size}: need >= 300 (256 byte pieces + "
                         "specials + merges)")
    max_bytes = 16384
    corpus = list(tqdm(sentences(inputs, args.json_keys, max_bytes), desc="reading", unit=" para",
                       disable=None))  # None: no bar when stderr is not a terminal
    if not corpus:
        raise DataConfigError("--input: no text found")

    out = Path(args.output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"training BPE, vocab {args.vocab_size}, on {len(corpus)} paragraphs", flush=True)
    model = io.BytesIO()  # in memory: a file prefix would be recorded inside the model
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=model, model_type="bpe",
            vocab_size=args.vocab_size, character_coverage=args.character_coverage,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            add_dummy_prefix=False, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
            max_sentence_length=max_bytes, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=1, minloglevel=2,
            unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>", **SPECIAL_IDS)
    except RuntimeError as e:
        raise UsageError(f"sentencepiece: {str(e).strip().splitlines()[-1]}") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = (sp.id_to_piece(i).replace("\n", "\\n") for i in range(sp.get_piece_size()))
    vocab = "".join(f"{piece}\t{sp.get_score(i):g}\n" for i, piece in enumerate(pieces))
    # tokenizer_metadata.json lets Megatron's own MegatronTokenizer.from_pretrained(<dir>) find
    # the library too.
    metadata = {"library": "sentencepiece", "model_type": "gpt", "class_name": None,
                "class_path": None, "chat_template": None}
    write_all({Path(f"{out}.model"): model.getvalue(), Path(f"{out}.vocab"): vocab.encode(),
               out.parent / "tokenizer_metadata.json": json.dumps(metadata).encode() + b"\n"})
    print(f"wrote {out}.model: {sp.get_piece_size()} pieces, unk={sp.unk_id()} bos={sp.bos_id()} "
          f"eos/eod={sp.eos_id()} pad={sp.pad_id()}")
    if args.chat_tokens:
        sys.path.insert(0, str(ROOT / "tools"))
        from add_chat_tokens import add_chat_tokens, corpus_files

        add_chat_tokens(f"{out}.model", corpus_files())
    return 0


def main(argv=None) -> int:
    return run_tool(run, build_parser(), argv, output="output_prefix")


if __name__ == "__main__":
    sys.exit(main())
