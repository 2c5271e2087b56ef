"""SFT data: chat jsonl -> indexed tokens + loss mask (once), then packed batches by step.

Preprocessing (`preprocess_chat`, tools/preprocess_chat_data.py). Each conversation is rendered
by chat.render_conversation and stored as one document in two parallel Megatron indexed
datasets written by Megatron-Core's IndexedDatasetBuilder:

    PREFIX_tokens_document.bin/.idx      token ids (uint16 when the vocabulary fits, else int32)
    PREFIX_loss_mask_document.bin/.idx   uint8 0/1 per token: 1 on assistant content + <|im_end|>
    PREFIX_chat.json                     counts, skips, the tokenizer's identity; written last

Two datasets with identical document lengths (rather than one interleaved stream) keep the
tokens a plain Megatron dataset that any tool reads, and cost one byte per token for the mask.
Workers tokenize chunks of lines and the results are consumed in input order, so the bytes do
not depend on --workers; everything is written under temporary names and renamed at the end.
Bad input (invalid JSON, a message without role or content, an unknown role, no assistant
turn) stops with "FILE:LINE: ..."; a conversation longer than --max-length tokens is skipped
and counted (long conversations are expected in real chat sets; malformed lines are not).

Training (`build_sft_data` -> `SFTData`, the trainer's data interface). PREFIXes given like
--data-path (weighted list) are read back; conversations longer than --seq-length are left out
(counted in the summary). An endless stream of conversations is drawn in a fixed shuffled
order: each source reshuffled every epoch with a seed from (--seed, source, epoch), sources
interleaved as Megatron's BlendedDataset does (the source furthest behind its weight next).
The stream is packed greedily, first fit, into rows of --seq-length tokens (a bounded set of
open rows; a row is emitted when full or when it is the oldest and a conversation fits none),
and row r of the packing is row r % gbs of global batch r // gbs. The plan is extended lazily
and depends on nothing but the flags, so a batch is a pure function of (step, rank) and a
resumed run reads exactly what an uninterrupted one would.

A conversation of n tokens fills n positions: tokens = ids, labels = ids shifted left (the last
label is padding), loss_mask[t] = mask[t + 1] (1 iff labels[t] is an assistant target),
position_ids restart at 0 per conversation. Packed rows carry a block-diagonal causal
`attention_mask` [b, 1, s, s] (True = masked out; trailing padding is a segment of its own, so
no row is all-masked) and `cu_seqlens` (int32 segment boundaries of the flattened [b * s]
tokens, padding included as its own segment) for TE's PackedSeqParams. --no-sft-pack puts one
conversation per row, right-padded, plain causal attention (no attention_mask). Because RoPE
depends only on relative positions inside a segment, a packed conversation gets the logits it
gets alone (tests/test_sft_data.py checks the loss to 1e-6).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_ext.data.args import add_tokenizer_args, parse_data_path, parse_split
from megatron_ext.data.indexed import IndexedOutputs, check_indexed_dataset, token_dtype
from megatron_ext.data.jsonl import EncodeStats, check_io, encoded_lines
from megatron_ext.data.sample import default_cache_root, once_per_node, prepared_dir
from megatron_ext.errors import DataConfigError
from megatron_ext.inference.chat import ChatTokenizer, parse_chat_line, render_conversation
from megatron_ext.task import TrainData

FORMAT = "marco-sft-1"
TOKENS, LOSS_MASK, INFO = "_tokens_document", "_loss_mask_document", "_chat.json"
OPEN_ROWS = 16  # rows open at once in first-fit packing
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sft"
_SAMPLE_FORMAT = "1"  # bump when the prepared layout of the sample changes


# ====================================================================== flags
@dataclass(frozen=True)
class SFTDataOptions:
    """What the SFT data flags mean once checked."""

    data_path: Optional[tuple[str, ...]] = None
    valid_data_path: Optional[tuple[str, ...]] = None
    split: str = "98,2,0"
    pack: bool = True
    max_conversations: int = 0  # per packed row; 0 = no limit
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: Optional[str] = None
    data_cache_path: Optional[str] = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SFTDataOptions":
        opts = cls(
            data_path=tuple(args.data_path) if args.data_path else None,
            valid_data_path=tuple(args.valid_data_path) if args.valid_data_path else None,
            split=args.split, pack=args.sft_pack, max_conversations=args.sft_max_conversations,
            tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
            data_cache_path=args.data_cache_path)
        check_sft_data_options(opts)
        return opts


def add_sft_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """SFT data flags (Megatron-LM names where they exist). The tokenizer and cache flags are
    added only if the parser does not define them already (e.g. through add_data_args)."""
    g = parser.add_argument_group("SFT data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="chat data prefixes written by tools/preprocess_chat_data.py, or a weighted "
                        "list 'w1 prefix1 w2 prefix2 ...' (default: the bundled SFT sample, data/sft)")
    g.add_argument("--valid-data-path", nargs="+", default=None,
                   help="chat data prefixes evaluated as separate validation sets (then --data-path "
                        "trains on all its conversations)")
    g.add_argument("--split", default="98,2,0",
                   help="train,valid,test share of each --data-path prefix's conversations (picked by "
                        "a fixed pseudo-random permutation) when there is no --valid-data-path")
    g.add_argument("--sft-pack", action=argparse.BooleanOptionalAction, default=True,
                   help="pack several conversations per sequence (block-diagonal attention, "
                        "positions restart per conversation); --no-sft-pack: one conversation per "
                        "row, right-padded")
    g.add_argument("--sft-max-conversations", type=int, default=0, metavar="N",
                   help="at most N conversations in one packed sequence (0: as many as fit)")
    add_tokenizer_args(g, cache_help="where the prepared SFT sample is cached "
                                     "(default: $MARCO_CACHE or ~/.cache/marco-megatron)", if_missing=True)
    return parser


def check_sft_data_options(opts: SFTDataOptions) -> None:
    """Checks that read no data."""

    if opts.data_path:
        parse_data_path(list(opts.data_path), "--data-path")
        parse_split(opts.split)
    if opts.valid_data_path:
        parse_data_path(list(opts.valid_data_path), "--valid-data-path")
    if opts.max_conversations < 0:
        raise DataConfigError(f"--sft-max-conversations {opts.max_conversations}: must be >= 0")


# ====================================================================== preprocessing
@dataclass
class ChatPreprocessStats(EncodeStats):
    conversations: int = 0
    loss_mask_tokens: int = 0
    skipped_long: list[str] = field(default_factory=list)  # FILE:LINE (N tokens)
    prefix: str = ""

    def summary(self) -> str:
        return (f"{self.conversations} conversations, {self.tokens} tokens ({self.loss_mask_tokens} "
                f"assistant targets) {self.source()}: {self.per_second(self.tokens):,.0f} tokens/s; "
                f"skipped {len(self.skipped_long)} over --max-length")


_W: dict = {}  # per-process worker state


def _init_worker(tokenizer_type, tokenizer_model, max_length, dtype):
    if _W.get("key") != (tokenizer_type, tokenizer_model):  # forked workers inherit the parent's
        _W.update(key=(tokenizer_type, tokenizer_model),
                  tok=ChatTokenizer.from_args(tokenizer_type, tokenizer_model))
    _W.update(max_length=max_length, dtype=dtype)


def _encode_line(raw: bytes, where: str):
    """-> ("ok", ids, loss_mask) | ("long", n) | ("bad", message)."""
    try:
        messages = parse_chat_line(raw, where)
    except DataConfigError as e:
        return ("bad", str(e))
    ids, loss_mask = render_conversation(messages, _W["tok"])
    if _W["max_length"] and len(ids) > _W["max_length"]:
        return ("long", len(ids))
    return ("ok", np.asarray(ids, dtype=_W["dtype"]), np.asarray(loss_mask, dtype=np.uint8))


def preprocess_chat(inputs, out_prefix: str, *, tokenizer_type: str = "SentencePieceTokenizer",
                    tokenizer_model=None, max_length: int = 8192, workers: int = 1,
                    progress: bool = True, chunk_bytes: int = 1 << 18,
                    overwrite: bool = True) -> ChatPreprocessStats:
    """Chat jsonl files -> PREFIX_tokens_document, PREFIX_loss_mask_document, PREFIX_chat.json.
    `overwrite=False` (the tool without --overwrite): an existing output is an error."""

    inputs = check_io(inputs, out_prefix, workers)
    existing = [p for p in output_files(out_prefix) if os.path.exists(p)]
    if existing and not overwrite:
        raise DataConfigError(f"--output-prefix {out_prefix}: {existing[0]} exists; pass "
                              "--overwrite to replace it")
    if max_length is not None and max_length < 1:
        raise DataConfigError(f"--max-length {max_length}: must be >= 1")
    tok = ChatTokenizer.from_args(tokenizer_type, tokenizer_model)
    dtype = token_dtype(tok.vocab_size)
    _W.update(key=(tokenizer_type, tokenizer_model), tok=tok)
    init = (tokenizer_type, tokenizer_model, max_length, dtype)

    stats = ChatPreprocessStats(prefix=out_prefix)
    t0 = time.perf_counter()
    with IndexedOutputs() as outputs, encoded_lines(
            inputs, _encode_line, _init_worker, init, workers=workers, chunk_bytes=chunk_bytes,
            progress=progress, desc="preprocess chat") as lines:
        tokens = outputs.add(TOKENS, f"{out_prefix}{TOKENS}", dtype)
        loss_masks = outputs.add(LOSS_MASK, f"{out_prefix}{LOSS_MASK}", np.uint8)
        for path, n, nbytes, res in lines:
            stats.input_bytes += nbytes
            if res[0] == "bad":
                raise DataConfigError(res[1])
            if res[0] == "long":
                stats.skipped_long.append(f"{path}:{n} ({res[1]} tokens)")
                continue
            _, ids, loss_mask = res
            tokens.add_document(ids, [ids.size])
            loss_masks.add_document(loss_mask, [loss_mask.size])
            stats.conversations += 1
            stats.tokens += ids.size
            stats.loss_mask_tokens += int(loss_mask.sum())
        if not stats.conversations:
            raise DataConfigError(f"--input {' '.join(inputs)}: no conversation to write ("
                                  f"{len(stats.skipped_long)} longer than --max-length {max_length})")
        outputs.finalize()
        info = {"format": FORMAT, "conversations": stats.conversations, "tokens": stats.tokens,
                "loss_mask_tokens": stats.loss_mask_tokens, "max_length": max_length,
                "skipped_over_max_length": len(stats.skipped_long), "inputs": inputs,
                "tokenizer": tokenizer_identity(tok, tokenizer_type)}
        outputs.write_text(f"{out_prefix}{INFO}", json.dumps(info, indent=1, sort_keys=True) + "\n")
        outputs.publish()  # INFO last: marks a complete set
    stats.seconds = time.perf_counter() - t0
    return stats


def output_files(out_prefix: str) -> list[str]:
    """The files preprocess_chat writes for `out_prefix`."""
    return [f"{out_prefix}{suffix}{ext}" for suffix in (TOKENS, LOSS_MASK) for ext in (".bin", ".idx")
            ] + [f"{out_prefix}{INFO}"]


def tokenizer_identity(tok: ChatTokenizer, tokenizer_type: str) -> dict:
    """What must match between preprocessing and training: the vocabulary and the chat ids."""
    return {"type": tokenizer_type, "model": tok.name, "vocab_size": tok.vocab_size,
            "vocab_sha256": tok.vocab_digest(), "im_start_id": tok.im_start_id,
            "im_end_id": tok.im_end_id, "eos_id": tok.eos_id}


# ====================================================================== reading
def _strip_prefix(prefix: str) -> str:
    for suffix in (TOKENS, LOSS_MASK):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


class ChatSource:
    """One preprocessed prefix: token and loss-mask documents, one per conversation."""

    def __init__(self, prefix: str, where: str, tok: ChatTokenizer):
        from megatron.core.datasets.indexed_dataset import IndexedDataset


        self.prefix = _strip_prefix(str(prefix))
        self.name = os.path.basename(self.prefix)
        info_path = f"{self.prefix}{INFO}"
        if not os.path.isfile(info_path):
            raise DataConfigError(f"{where} {prefix}: no {info_path}; prepare chat data with "
                                  "tools/preprocess_chat_data.py --output-prefix PREFIX")
        self.info = json.loads(Path(info_path).read_text())
        if self.info.get("format") != FORMAT:
            raise DataConfigError(f"{where} {prefix}: {info_path} is not {FORMAT} chat data")
        mine = tokenizer_identity(tok, self.info["tokenizer"]["type"])
        theirs = self.info["tokenizer"]
        for key in ("vocab_sha256", "im_start_id", "im_end_id"):
            if theirs.get(key) != mine[key]:
                raise DataConfigError(
                    f"{where} {prefix}: tokenized with {theirs.get('model')} but training uses "
                    f"{tok.name} ({key} differs); preprocess again with this tokenizer")
        check_indexed_dataset(f"{self.prefix}{TOKENS}", where, tok.vocab_size)
        check_indexed_dataset(f"{self.prefix}{LOSS_MASK}", where)
        self.tokens = IndexedDataset(f"{self.prefix}{TOKENS}")
        self.loss_mask = IndexedDataset(f"{self.prefix}{LOSS_MASK}")
        self.lengths = np.asarray(self.tokens.sequence_lengths, dtype=np.int64)
        if not np.array_equal(self.lengths, self.loss_mask.sequence_lengths):
            raise DataConfigError(f"{where} {prefix}: tokens and loss mask have different lengths")

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.tokens[doc], dtype=np.int64), np.asarray(self.loss_mask[doc], dtype=np.float32)


# ====================================================================== packing
class _Packer:
    """First-fit of a conversation stream into rows of `capacity` tokens, at most `open_rows`
    open at once. Emits rows (lists of items) in a deterministic order."""

    def __init__(self, capacity: int, pack: bool, max_items: int = 0, open_rows: int = OPEN_ROWS):
        self.capacity, self.pack, self.max_items = capacity, pack, max_items or 1 << 30
        self.open_rows = open_rows
        self.rows: list[list] = []  # [room, items]

    def add(self, item, length: int) -> list[list]:
        if not self.pack:
            return [[item]]
        for k, row in enumerate(self.rows):
            if row[0] >= length and len(row[1]) < self.max_items:
                row[0] -= length
                row[1].append(item)
                if row[0] == 0 or len(row[1]) == self.max_items:
                    return [self.rows.pop(k)[1]]
                return []
        out = [self.rows.pop(0)[1]] if len(self.rows) == self.open_rows else []
        self.rows.append([self.capacity - length, [item]])
        return out

    def flush(self) -> list[list]:
        out, self.rows = [row[1] for row in self.rows], []
        return out


class _Stream:
    """Endless (source, doc) stream: each source's eligible conversations in a fresh shuffle
    per epoch, sources interleaved so that each stays closest to its weight (Megatron's
    BlendedDataset rule)."""

    def __init__(self, docs: list[np.ndarray], weights: list[float], seed: int):
        self.docs, self.seed = docs, seed
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.epoch = [0] * len(docs)
        self.pos = [0] * len(docs)
        self.count = [0] * len(docs)
        self.perm = [self._perm(j, 0) for j in range(len(docs))]
        self.i = 0

    def _perm(self, j: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, j, epoch]).permutation(self.docs[j])

    def next(self) -> tuple[int, int]:
        n = self.i + 1
        j = max(range(len(self.docs)), key=lambda k: self.weights[k] * n - self.count[k])
        if self.pos[j] == len(self.perm[j]):
            self.epoch[j] += 1
            self.perm[j], self.pos[j] = self._perm(j, self.epoch[j]), 0
        doc = int(self.perm[j][self.pos[j]])
        self.pos[j] += 1
        self.count[j] += 1
        self.i = n
        return j, doc


class _TrainPlan:
    """Rows of the packed stream, extended lazily; per-step token counts per source."""

    def __init__(self, sources: list[ChatSource], docs: list[np.ndarray], weights: list[float],
                 seed: int, seq_length: int, pack: bool, max_items: int, rows_per_step: int):
        self.sources = sources
        self.stream = _Stream(docs, weights, seed)
        self.packer = _Packer(seq_length, pack, max_items)
        self.rows_per_step = rows_per_step
        self.row_ptr, self.src, self.doc = array("q", [0]), array("i"), array("q")
        self.step_tokens: list[np.ndarray] = []  # cumulative tokens per source after each step

    def rows(self) -> int:
        return len(self.row_ptr) - 1

    def ensure(self, rows: int) -> None:
        while self.rows() < rows:
            j, doc = self.stream.next()
            for row in self.packer.add((j, doc), int(self.sources[j].lengths[doc])):
                for a, b in row:
                    self.src.append(a)
                    self.doc.append(b)
                self.row_ptr.append(len(self.src))
        while len(self.step_tokens) < self.rows() // self.rows_per_step:
            s = len(self.step_tokens)
            lo, hi = self.row_ptr[s * self.rows_per_step], self.row_ptr[(s + 1) * self.rows_per_step]
            counts = np.zeros(len(self.sources), dtype=np.int64)
            for a, b in zip(self.src[lo:hi], self.doc[lo:hi]):
                counts[a] += self.sources[a].lengths[b]
            self.step_tokens.append(counts + (self.step_tokens[-1] if s else 0))

    def row(self, r: int) -> list[tuple[int, int]]:
        self.ensure(r + 1)
        lo, hi = self.row_ptr[r], self.row_ptr[r + 1]
        return list(zip(self.src[lo:hi], self.doc[lo:hi]))


def assemble(convs: list[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int,
             pack: bool) -> dict:
    """One row: conversations (ids, 0/1 loss mask over the ids) laid end to end, then padding;
    the row's `loss_mask` is over its labels (the ids shifted left)."""
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    position_ids = np.arange(seq_length, dtype=np.int64)
    bounds, off = [0], 0
    for ids, conv_loss_mask in convs:
        n = len(ids)
        tokens[off:off + n] = ids
        labels[off:off + n - 1] = ids[1:]
        loss_mask[off:off + n - 1] = conv_loss_mask[1:]
        position_ids[off:off + n] = np.arange(n)
        off += n
        bounds.append(off)
    if off < seq_length:
        if pack:
            position_ids[off:] = np.arange(seq_length - off)
        bounds.append(seq_length)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": position_ids, "bounds": bounds}


def block_causal_mask(bounds: list[int], seq_length: int) -> torch.Tensor:
    """[1, s, s] bool, True = masked: causal and within one segment [bounds[k], bounds[k+1])."""
    seg = torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(np.diff(bounds)))
    future = torch.ones(seq_length, seq_length, dtype=torch.bool).triu(1)
    return ((seg[:, None] != seg[None, :]) | future).unsqueeze(0)


def collate(rows: list[dict], seq_length: int, pack: bool, attention_mask: bool = True) -> dict:
    batch = {k: torch.from_numpy(np.stack([r[k] for r in rows]))
             for k in ("tokens", "labels", "loss_mask", "position_ids")}
    if pack and attention_mask:
        batch["attention_mask"] = torch.stack([block_causal_mask(r["bounds"], seq_length) for r in rows])
    if pack:
        cu = [0] + [i * seq_length + b for i, r in enumerate(rows) for b in r["bounds"][1:]]
        batch["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    return batch


def rank_rows(gbs: int, dp_rank: int, dp_size: int, mbs: int) -> list[list[int]]:
    """Rows of a global batch for one data-parallel rank, micro-batch by micro-batch (the layout
    of Megatron-LM's pretraining sampler)."""
    if not 0 <= dp_rank < dp_size or mbs < 1 or gbs % (mbs * dp_size):
        raise ValueError(f"global batch {gbs} does not split into micro-batches of {mbs} x "
                         f"{dp_size} ranks (rank {dp_rank})")
    per = mbs * dp_size
    return [[m * per + dp_rank * mbs + j for j in range(mbs)] for m in range(gbs // per)]


# ====================================================================== the trainer's data
class SFTData(TrainData):
    """Packed (or padded) SFT batches by step, validation sets, consumed tokens by source."""

    def __init__(self, sources: list[ChatSource], train_docs: list[np.ndarray], weights: list[float],
                 validation: dict[str, tuple[ChatSource, np.ndarray]], *, tokenizer: ChatTokenizer,
                 global_batch_size: int, seq_length: int, train_iters: int, seed: int,
                 pack: bool = True, max_conversations: int = 0, skipped: Optional[dict] = None,
                 attention_mask: bool = True):
        self.sources, self.train_docs, self.weights = sources, train_docs, weights
        self.tokenizer = tokenizer
        self.global_batch_size, self.seq_length = global_batch_size, seq_length
        self.train_iters, self.seed, self.pack = train_iters, seed, pack
        self.max_conversations = max_conversations
        self.attention_mask = attention_mask
        self.skipped = skipped or {}
        self.plan = _TrainPlan(sources, train_docs, weights, seed, seq_length, pack,
                               max_conversations, global_batch_size)
        self.validation = {}
        for name, (src, docs) in validation.items():
            packer = _Packer(seq_length, pack, max_conversations)
            rows = [r for d in docs for r in packer.add(int(d), int(src.lengths[d]))] + packer.flush()
            self.validation[name] = (src, rows)

    # ------------------------------------------------------------ training
    def _row(self, convs: list[tuple[int, int]]) -> dict:
        return assemble([self.sources[j].get(d) for j, d in convs], self.seq_length,
                        self.tokenizer.pad_id, self.pack)

    def micro_batches(self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[dict]:
        """This rank's micro-batches of global batch `step` (0-based)."""
        base = step * self.global_batch_size
        return [collate([self._row(self.plan.row(base + r)) for r in rows], self.seq_length, self.pack,
                        self.attention_mask)
                for rows in rank_rows(self.global_batch_size, dp_rank, dp_size, micro_batch_size)]

    def batch_conversations(self, step: int) -> list[list[tuple[str, int]]]:
        """(source name, conversation index) of each row of global batch `step`."""
        base = step * self.global_batch_size
        return [[(self.sources[j].name, d) for j, d in self.plan.row(base + r)]
                for r in range(self.global_batch_size)]

    def stage_at(self, step: int) -> None:
        return None  # no curriculum

    def consumed_tokens_by_source(self, step: int) -> dict[str, int]:
        """Conversation tokens (padding excluded) read from each source in steps 0..step."""
        self.plan.ensure((step + 1) * self.global_batch_size)
        return {s.name: int(c) for s, c in zip(self.sources, self.plan.step_tokens[step])}

    # ------------------------------------------------------------ validation
    def validation_names(self) -> list[str]:
        return list(self.validation)

    def validation_rows(self, name: str) -> int:
        """Rows of validation set `name`; micro-batches past them are all padding (no targets),
        so ceil(rows / (mbs * dp)) micro-batches give the loss over every conversation once."""
        return len(self.validation[name][1])

    def validation_micro_batches(self, name: str, num_micro_batches: int, dp_rank: int,
                                 dp_size: int, micro_batch_size: int) -> list[dict]:
        """The same rows at every call: row m * mbs * dp + rank * mbs + j of the set."""
        if name not in self.validation:
            raise KeyError(f"no validation set {name!r}; have {self.validation_names()}")
        src, rows = self.validation[name]
        per = micro_batch_size * dp_size
        out = []
        for m in range(num_micro_batches):
            idx = [m * per + dp_rank * micro_batch_size + j for j in range(micro_batch_size)]
            out.append(collate([assemble([src.get(d) for d in rows[i]] if i < len(rows) else [],
                                         self.seq_length, self.tokenizer.pad_id, self.pack)
                                for i in idx], self.seq_length, self.pack, self.attention_mask))
        return out

    # ------------------------------------------------------------ reporting
    def packing_stats(self, steps: int = 4) -> dict:
        """Conversations per row, and the share of positions that are conversation tokens and
        assistant targets, over the first `steps` steps."""
        rows = steps * self.global_batch_size
        self.plan.ensure(rows)
        convs = self.plan.row_ptr[rows]
        pairs = zip(self.plan.src[:convs], self.plan.doc[:convs])
        tokens = sum(int(self.sources[j].lengths[d]) for j, d in pairs)
        return {"conversations_per_row": convs / rows, "fill": tokens / (rows * self.seq_length)}

    def summary(self) -> list[str]:
        total = sum(self.weights)
        lines = []
        for s, docs, w in zip(self.sources, self.train_docs, self.weights):
            skip = self.skipped.get(s.name, 0)
            lines.append(f"sft data {s.name}: {len(docs)} training conversations, weight {w / total:.1%}"
                         + (f", {skip} longer than --seq-length {self.seq_length} left out" if skip else ""))
        st = self.packing_stats(1)
        mode = "packed" if self.pack else "one conversation per row"
        lines.append(f"sft batches: {mode}, {st['conversations_per_row']:.2f} conversations per row, "
                     f"{st['fill']:.1%} of positions are tokens (first step)")
        if self.validation:
            lines.append("sft validation sets: " + ", ".join(
                f"{n} ({len(self.validation[n][1])} rows)" for n in self.validation))
        return lines


# ====================================================================== building
def _split_docs(n: int, fractions: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Train and valid conversation indices of a prefix: contiguous shares of a fixed permutation
    (independent of --seed, so the held-out set stays the same across runs)."""
    perm = np.random.default_rng(20240607).permutation(n)
    bounds = np.concatenate([[0], np.cumsum(fractions)])
    ends = [int(round(b * n)) for b in bounds]
    return np.sort(perm[ends[0]:ends[1]]), np.sort(perm[ends[1]:ends[2]])


def _fitting(src: ChatSource, docs: np.ndarray, seq_length: int, where: str) -> np.ndarray:
    """The validation conversations of `docs` that fit one row (an empty set is an error)."""
    fits = docs[src.lengths[docs] <= seq_length]
    if not len(fits):
        raise DataConfigError(f"{where} {src.prefix}: no validation conversation fits --seq-length "
                              f"{seq_length}")
    return fits


def _sample(opts: SFTDataOptions) -> dict:
    """Prepare the bundled SFT sample once per node (local rank 0 first, then the others)."""
    import functools


    return once_per_node(functools.partial(prepare_sft_sample, opts.data_cache_path, opts.tokenizer_type,
                                           opts.tokenizer_model))


def build_sft_data(opts, tokenizer, *, global_batch_size: int, seq_length: int, train_iters: int,
                   seed: int, attention_mask: bool = True) -> SFTData:
    """Check the SFT data flags and open the data (call on every rank).

    `opts`: SFTDataOptions or the parsed flags of add_sft_data_args; `tokenizer`: the trainer's
    Megatron tokenizer (or a ChatTokenizer). Data: --data-path, else the bundled SFT sample.
    `attention_mask=False`: packed batches carry `cu_seqlens` but no dense [b, 1, s, s] mask
    (TE's PackedSeqParams path; the mask costs s * s bytes per row to build)."""

    if not isinstance(opts, SFTDataOptions):
        opts = SFTDataOptions.from_args(opts)
    check_sft_data_options(opts)
    if global_batch_size < 1 or seq_length < 2 or train_iters < 1:
        raise DataConfigError("global batch size, train iterations must be >= 1, sequence length >= 2")
    tok = tokenizer if isinstance(tokenizer, ChatTokenizer) else ChatTokenizer.from_megatron(tokenizer)

    validation_prefixes: list[str] = []
    if opts.data_path:
        prefixes, weights = parse_data_path(list(opts.data_path), "--data-path")
        flag = "--data-path"
    else:
        info = _sample(opts)
        prefixes, weights, flag = [info["train"]], None, "SFT sample"
        if not opts.valid_data_path:
            validation_prefixes = [info["valid"]]
    sources = [ChatSource(p, flag, tok) for p in prefixes]
    names = [s.name for s in sources]
    if len(set(names)) < len(names):
        for s in sources:
            s.name = s.prefix

    fractions = parse_split(opts.split) if opts.data_path and not opts.valid_data_path else [1.0, 0, 0]
    train_docs, skipped, validation = [], {}, {}
    for s in sources:
        train, valid = _split_docs(len(s), fractions)
        fits = s.lengths[train] <= seq_length
        skipped[s.name] = int((~fits).sum())
        if not fits.any():
            shortest = (f"the shortest has {int(s.lengths[train].min())} tokens" if len(train)
                        else f"--split {opts.split} leaves none for training")
            raise DataConfigError(f"{flag} {s.prefix}: no training conversation fits --seq-length "
                                  f"{seq_length} ({shortest})")
        train_docs.append(train[fits])
        if fractions[1] > 0:
            if not len(valid):
                raise DataConfigError(f"--split {opts.split}: {s.prefix} has {len(s)} conversations, "
                                      "none for validation (use --valid-data-path or another --split)")
            validation[s.name] = (s, _fitting(s, valid, seq_length, f"--split {opts.split}: validation of"))
    if opts.valid_data_path:
        validation_prefixes = parse_data_path(list(opts.valid_data_path), "--valid-data-path")[0]
    for p in validation_prefixes:
        where = "--valid-data-path" if opts.valid_data_path else flag
        v = ChatSource(p, where, tok)
        docs = _fitting(v, np.arange(len(v)), seq_length, where)
        validation[v.name if v.name not in validation else v.prefix] = (v, docs)
    if weights is None:  # blended by size, as Megatron does for an unweighted list
        weights = [float(len(d)) for d in train_docs]
    data = SFTData(sources, train_docs, weights, validation, tokenizer=tok,
                   global_batch_size=global_batch_size, seq_length=seq_length,
                   train_iters=train_iters, seed=seed, pack=opts.pack,
                   max_conversations=opts.max_conversations, skipped=skipped,
                   attention_mask=attention_mask)
    return data


# ====================================================================== the bundled sample
def _sample_key(tokenizer_type: str, tok: ChatTokenizer) -> str:
    h = hashlib.sha256(f"{_SAMPLE_FORMAT} {tokenizer_type}\n".encode())
    h.update((SAMPLE_DIR / "manifest.json").read_bytes())
    h.update(tokenizer_identity(tok, tokenizer_type)["vocab_sha256"].encode())
    return h.hexdigest()[:16]


def prepare_sft_sample(cache_dir=None, tokenizer_type: str = "SentencePieceTokenizer",
                       tokenizer_model=None) -> dict:
    """Tokenize data/sft/{train,valid}.jsonl.gz once into the cache; returns {"dir", "train":
    prefix, "valid": prefix, "conversations": {split: n}} with absolute prefixes."""

    if not (SAMPLE_DIR / "manifest.json").is_file():
        raise DataConfigError(f"SFT sample: {SAMPLE_DIR}/manifest.json is missing")
    tok = ChatTokenizer.from_args(tokenizer_type, tokenizer_model)
    root = Path(cache_dir) if cache_dir else default_cache_root()

    def fill(tmp: Path, out: Path) -> dict:
        info = {"dir": str(out), "conversations": {}}
        for split in ("train", "valid"):
            stats = preprocess_chat([SAMPLE_DIR / f"{split}.jsonl.gz"], str(tmp / f"sft_{split}"),
                                    tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                                    max_length=None, workers=1, progress=False)
            info[split] = str(out / f"sft_{split}")
            info["conversations"][split] = stats.conversations
        return info

    return prepared_dir(root / "sft_sample" / _sample_key(tokenizer_type, tok), fill)
