#!/usr/bin/env python3
"""Give a SentencePiece BPE model the ChatML tokens <|im_start|> and <|im_end|>, changing no id
the corpus encodes to.

Retraining would move every piece (and every pre-training number). Instead two pieces that
encoding the corpus never produces become USER_DEFINED pieces <|im_start|> and <|im_end|>
(SentencePiece matches them in text as single tokens and never merges them). A piece can go
only if the corpus never ends with it and never forms it on the way to a longer piece: the
candidates (never in the corpus' ids, highest ids = last merges learned first) are tried one
by one on the corpus lines that contain their text, and the first two whose removal changes no
id there are taken. The script then encodes the whole corpus with the old and the new model and
refuses to write unless every id is identical.

Idempotent: a model that already has both tokens as single pieces is left as it is.
Deterministic: the same model and corpus give the same edit. Writes the .model and .vocab in
place (or --output PREFIX) and records the edit in tokenizer_metadata.json beside them.

    python tools/add_chat_tokens.py                       # data/tokenizer/marco_tiny_spm.model
    python tools/add_chat_tokens.py --model runs/quickstart/tokenizer/marco_tiny_spm.model
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "data" / "tokenizer" / "marco_tiny_spm.model"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
NORMAL, USER_DEFINED = 1, 4  # sentencepiece ModelProto.SentencePiece.Type


def corpus_files() -> list[str]:
    return sorted(str(p) for p in (ROOT / "data" / "corpus").glob("*.jsonl.gz"))


def read_texts(paths: list[str], key: str = "text") -> list[str]:
    from megatron_ext.errors import UsageError

    texts = []
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            texts.append(json.loads(line)[key])
                        except (ValueError, KeyError, TypeError):
                            raise UsageError(
                                f"{path}:{n}: expected a JSON object with a string '{key}'") from None
        except OSError as e:
            raise UsageError(f"--corpus {path}: cannot read ({e.strerror or e})") from None
    return texts


def load_proto(data: bytes):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)
    return proto


def encode_all(model: bytes, texts: list[str]) -> list[list[int]]:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model).encode(texts)


def has_chat_tokens(model: bytes) -> bool:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    return all(sp.piece_to_id(t) != sp.unk_id() and sp.encode(t) == [sp.piece_to_id(t)] for t in CHAT_TOKENS)


def lines_of(texts: list[str]) -> list[str]:
    """Distinct non-empty lines: "\n" is a user-defined piece, never merged, so a text's ids are
    its lines' ids joined by the newline id, and a piece can only matter to the lines it occurs in."""
    return sorted({line for text in texts for line in text.split("\n") if line})


def choose_pieces(proto, lines: list[str], counts: Counter, n: int = len(CHAT_TOKENS)) -> list[int]:
    """The n highest-id NORMAL multi-character pieces that the corpus never encodes to and whose
    removal leaves the ids of every line containing their text unchanged (a piece the corpus never
    ends with can still be an intermediate of a merge: those are rejected)."""
    from sentencepiece import sentencepiece_model_pb2

    free = [i for i, p in enumerate(proto.pieces) if p.type == NORMAL and len(p.piece) > 1 and counts[i] == 0]
    chosen: list[int] = []
    for i in reversed(free):
        text = proto.pieces[i].piece.replace("\u2581", " ")  # SentencePiece's space symbol
        touched = [line for line in lines if text in line]
        trial = sentencepiece_model_pb2.ModelProto()
        trial.CopyFrom(proto)
        trial.pieces[i].piece, trial.pieces[i].type = CHAT_TOKENS[0], USER_DEFINED
        if not touched or encode_all(trial.SerializeToString(), touched) == encode_all(
                proto.SerializeToString(), touched):
            chosen.append(i)
            if len(chosen) == n:
                break
    return sorted(chosen)


def original_model(model: bytes, record: dict) -> bytes:
    """The model before the edit that `record` (tokenizer_metadata.json's "chat_tokens")
    describes, byte for byte (its sha256 is record["sha256_before"])."""
    proto = load_proto(model)
    for r in record["replaced"]:
        piece = proto.pieces[r["id"]]
        piece.piece, piece.score = r["piece"], r["score"]
        piece.ClearField("type")  # NORMAL pieces leave the field unset
    return proto.SerializeToString()


def vocab_text(proto) -> str:
    """The .vocab file train_tokenizer.py writes: piece<TAB>score per line, newline escaped."""
    return "".join(f"{p.piece.replace(chr(10), chr(92) + 'n')}\t{p.score:g}\n" for p in proto.pieces)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def add_chat_tokens(model_path, corpus: list[str], output_prefix=None, progress=print) -> dict:
    """Edit the model (see the module docstring); returns the record written to the metadata."""
    from megatron_ext.errors import UsageError
    from megatron_ext.inference.chat import CHAT_TEMPLATE

    model_path = Path(model_path)
    if not model_path.is_file():
        raise UsageError(f"--model {model_path}: no such SentencePiece model file")
    old = model_path.read_bytes()
    try:
        proto = load_proto(old)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise UsageError(f"--model {model_path}: not a SentencePiece model ({e})") from None
    out = Path(output_prefix) if output_prefix else model_path.with_suffix("")
    meta_path = out.parent / "tokenizer_metadata.json"
    if has_chat_tokens(old):
        progress(f"{model_path}: already has {' and '.join(CHAT_TOKENS)} as single tokens; unchanged")
        if out != model_path.with_suffix(""):
            atomic_write(Path(f"{out}.model"), old)
            atomic_write(Path(f"{out}.vocab"), vocab_text(proto).encode())
        return json.loads(meta_path.read_text()).get("chat_tokens", {}) if meta_path.is_file() else {}
    if proto.trainer_spec.model_type != 2:
        raise UsageError(f"--model {model_path}: only BPE models are edited (this one is type "
                         f"{proto.trainer_spec.model_type}); retrain with the tokens instead")
    texts = read_texts(corpus)
    if not texts:
        raise UsageError("--corpus: no text to check the edit against")
    progress(f"encoding {len(texts)} documents of {len(corpus)} file(s) with the old model")
    before = encode_all(old, texts)
    counts = Counter(i for ids in before for i in ids)
    chosen = choose_pieces(proto, lines_of(texts), counts)
    if len(chosen) < len(CHAT_TOKENS):
        raise UsageError(f"--model {model_path}: fewer than {len(CHAT_TOKENS)} BPE pieces are unused "
                         "by the corpus; retrain the tokenizer with the chat tokens instead")
    record = {"sha256_before": hashlib.sha256(old).hexdigest(), "replaced": []}
    for token, i in zip(CHAT_TOKENS, chosen):
        piece = proto.pieces[i]
        record["replaced"].append({"id": i, "piece": piece.piece, "score": piece.score, "token": token})
        piece.piece, piece.type, piece.score = token, USER_DEFINED, 0.0
    new = proto.SerializeToString()
    progress("encoding it again with the new model")
    after = encode_all(new, texts)
    if after != before:
        bad = next(k for k, (a, b) in enumerate(zip(after, before)) if a != b)
        raise UsageError(f"--model {model_path}: the edit would change the ids of corpus document "
                         f"{bad}; nothing written")
    if not has_chat_tokens(new):
        raise UsageError(f"--model {model_path}: the edited model does not encode the chat tokens "
                         "as single pieces; nothing written")
    record["sha256_after"] = hashlib.sha256(new).hexdigest()
    record["corpus_documents"] = len(texts)
    record["corpus_tokens"] = sum(len(ids) for ids in before)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(f"{out}.vocab"), vocab_text(proto).encode())
    atomic_write(Path(f"{out}.model"), new)
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {
        "library": "sentencepiece", "model_type": "gpt", "class_name": None, "class_path": None}
    meta["chat_template"] = CHAT_TEMPLATE
    meta["chat_tokens"] = record
    atomic_write(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    for r in record["replaced"]:
        progress(f"id {r['id']}: {r['piece']!r} -> {r['token']}")
    progress(f"corpus ids identical before and after ({record['corpus_tokens']} tokens); wrote "
             f"{out}.model, {out}.vocab, {meta_path}")
    return record


def main(argv=None) -> int:
    from megatron_ext.cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="SentencePiece .model to edit (default: the bundled tokenizer)")
    p.add_argument("--corpus", nargs="+", default=None,
                   help="JSON-lines files whose 'text' must keep its ids "
                        "(default: every data/corpus/*.jsonl.gz, train and valid)")
    p.add_argument("--output-prefix", default=None,
                   help="write PREFIX.model/.vocab (default: edit --model in place)")
    args = p.parse_args(argv)
    from megatron_ext.errors import MarcoError, report

    try:
        add_chat_tokens(args.model, args.corpus or corpus_files(), args.output_prefix)
    except MarcoError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
