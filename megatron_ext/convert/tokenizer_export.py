"""Tokenizer files for an exported Hugging Face directory.

A Hugging Face tokenizer directory is copied. A SentencePiece model (the tiny presets'
`marco_tiny_spm.model`) becomes a `tokenizer.json` that `transformers.AutoTokenizer` loads:
the same BPE vocabulary and merges (merge priority = piece id, SentencePiece's BPE order), byte
fallback, spaces as "▁" and no dummy prefix or BOS, i.e. exactly the ids the model was trained
on (tests/test_export.py compares them over the sample corpus).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from megatron_ext.errors import ConversionError
from megatron_ext.inference.chat import CHAT_TEMPLATE, IM_END, IM_START

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                      "chat_template.jinja", "chat_template.json")
SPM_TYPES = {"normal": 1, "unknown": 2, "control": 3, "user_defined": 4, "byte": 6}


def find_tokenizer(path: str, where: str) -> tuple[str, str]:
    """('hf', directory) or ('spm', model file) for a --tokenizer-dir or a recorded path."""
    if os.path.isfile(path) and path.endswith(".model"):
        return "spm", path
    if not os.path.isdir(path):
        raise ConversionError(f"{where} {path}: no such tokenizer directory")
    if any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
        return "hf", path
    models = sorted(n for n in os.listdir(path) if n.endswith(".model"))
    if len(models) == 1:
        return "spm", os.path.join(path, models[0])
    raise ConversionError(f"{where} {path}: neither a Hugging Face tokenizer (tokenizer.json / "
                          f"tokenizer_config.json) nor one SentencePiece .model file")


def copy_tokenizer_files(src: str, out_dir: str) -> list[str]:
    copied = []
    for name in HF_TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(out_dir, name))
            copied.append(name)
    return copied


def bpe_merges(vocab: dict) -> list[tuple[str, str]]:
    """SentencePiece BPE as merge rules: every piece that two pieces concatenate to, ranked by
    the merged piece's id (SentencePiece orders BPE pieces by merge order), then by the ids of
    its parts."""
    merges = []
    for piece, rank in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def sentencepiece_to_hf(model_file: str, out_dir: str, max_length: Optional[int] = None) -> list[str]:
    """Write tokenizer.json + tokenizer_config.json equivalent to a SentencePiece BPE model
    trained as tools/train_tokenizer.py does (identity normalisation, no dummy prefix)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        with open(model_file, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise ConversionError(f"{model_file}: not a SentencePiece model ({e})") from None
    norm = proto.normalizer_spec
    if proto.trainer_spec.model_type != 2 or norm.add_dummy_prefix or norm.remove_extra_whitespaces \
            or (norm.name and norm.name != "identity") or norm.precompiled_charsmap:
        raise ConversionError(
            f"{model_file}: only SentencePiece BPE models with identity normalisation and no "
            "dummy prefix (tools/train_tokenizer.py) are converted; pass --tokenizer-dir with a "
            "Hugging Face tokenizer instead")
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    tok = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(vocab), unk_token=pieces[
        proto.trainer_spec.unk_id].piece, byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    # Control and unknown pieces are special; user-defined ones ("\n") are split off as is,
    # except the ChatML markers (tools/add_chat_tokens.py), special as in Qwen3's tokenizer.
    chat = [p for p in pieces if p.type == SPM_TYPES["user_defined"] and p.piece in (IM_START, IM_END)]
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in pieces
                            if p.type in (SPM_TYPES["unknown"], SPM_TYPES["control"])] +
                           [AddedToken(p.piece, special=True, normalized=False) for p in chat])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in pieces
                    if p.type == SPM_TYPES["user_defined"] and p not in chat])
    spec = proto.trainer_spec

    def piece(i):
        return pieces[i].piece if 0 <= i < len(pieces) else None

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=piece(spec.bos_id), eos_token=piece(spec.eos_id),
        unk_token=piece(spec.unk_id), pad_token=piece(spec.pad_id),
        **({"model_max_length": max_length} if max_length else {}))
    wrapped.save_pretrained(out_dir)
    # The generic fast-tokenizer class name, which transformers 4 and 5 both resolve.
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if len(chat) == 2:  # apply_chat_template renders what SFT trained on
        config["chat_template"] = CHAT_TEMPLATE
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return sorted(n for n in os.listdir(out_dir) if n in HF_TOKENIZER_FILES)


def special_token_ids(out_dir: str) -> dict:
    """bos/eos/pad ids of the tokenizer written to `out_dir` (for config.json and generation)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}
