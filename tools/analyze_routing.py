#!/usr/bin/env python3
"""Expert-routing analysis of a Marco MoE checkpoint: which experts each language uses.

    python tools/analyze_routing.py --load runs/tiny/ckpt --out runs/routing

Runs the model over per-language text (by default the held-out split of the bundled sample
corpus), records through router hooks which experts every token is routed to in every MoE
layer, and writes to --out:

  signatures.npz / signatures.csv   share of each language's routed tokens per expert per layer
  correlation.csv                   Pearson correlation between the languages' signatures
  clustering.json                   average-linkage clustering (SciPy) and dendrogram order
  correlation_heatmap.png           the heatmap with the dendrogram
  entropy.csv                       routing entropy (bits) per language and layer
  unused_experts.json               experts no token reached, per layer
  summary.json                      the run: checkpoint, languages, tokens, layers
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from megatron_ext.cli import UsageError, atomic_directory, run_tool, tool_parser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__)
    p.add_argument("--load", required=True, help="Marco MoE checkpoint (root or iteration dir)")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--corpus", nargs="+",
                   help="a directory of <lang>[.valid].jsonl[.gz] files, or lang=PREFIX indexed "
                        "datasets (default: the sample corpus' held-out split)")
    p.add_argument("--layers", help="comma-separated 0-based MoE layers (default: all)")
    p.add_argument("--max-tokens-per-language", type=int, default=16384,
                   help="tokens of each language run through the model")
    p.add_argument("--seq-length", type=int, default=256, help="tokens per sequence")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--tokenizer-type", help="default: the tokenizer the checkpoint records")
    p.add_argument("--tokenizer-model", help="default: the tokenizer the checkpoint records")
    p.add_argument("--json-key", default="text", help="key of the text field of --corpus jsonl files")
    return p


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    if not spec:
        return list(range(num_layers))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--layers {spec}: expected comma-separated layer indices") from None
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad or not layers:
        raise UsageError(
            f"--layers {spec}: unknown layer index {bad[0] if bad else spec}; the model has "
            f"MoE layers 0..{num_layers - 1}"
        )
    return layers


def _tokenizer(args, checkpoint_info: dict):
    from megatron_ext.data import build_tokenizer

    recorded = checkpoint_info.get("tokenizer") or {}
    kind = args.tokenizer_type or recorded.get("tokenizer_type") or "SentencePieceTokenizer"
    model = args.tokenizer_model or recorded.get("tokenizer_model")
    return kind, model, build_tokenizer(kind, model)


def _documents_from_jsonl(path: Path, key: str):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if key not in record:
                    raise UsageError(f"{path}:{number}: no {key!r} field")
                yield record[key]


def language_token_streams(args, kind: str, model, tokenizer) -> dict[str, np.ndarray]:
    """Per language, documents tokenised and joined with EOD, cut to the token budget."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ext.data import check_indexed_dataset

    budget = args.max_tokens_per_language
    streams: dict[str, np.ndarray] = {}
    if not args.corpus:
        from megatron_ext.data import prepare_sample_corpus

        sources = {lang: ("indexed", p) for lang, p in prepare_sample_corpus(
            tokenizer_model=model, tokenizer_type=kind)["valid"].items()}
    elif len(args.corpus) == 1 and Path(args.corpus[0]).is_dir():
        directory = Path(args.corpus[0])
        files = sorted(directory.glob("*.jsonl")) + sorted(directory.glob("*.jsonl.gz"))
        if not files:
            raise UsageError(f"--corpus {directory}: no .jsonl or .jsonl.gz files")
        sources = {}
        for f in files:
            lang = f.name.split(".")[0]
            if ".train." not in f.name:  # prefer held-out text where both exist
                sources.setdefault(lang, ("jsonl", f))
    else:
        sources = {}
        for item in args.corpus:
            lang, sep, prefix = item.partition("=")
            if not sep or not lang or not prefix:
                raise UsageError(f"--corpus {item}: expected LANG=PREFIX or one directory")
            sources[lang] = ("indexed", prefix)

    for lang, (kind_of_source, where) in sorted(sources.items()):
        pieces, total = [], 0
        if kind_of_source == "indexed":
            check_indexed_dataset(str(where), f"--corpus {lang}")  # missing, corrupt or empty
            dataset = IndexedDataset(str(where))
            documents = (np.asarray(dataset[i], dtype=np.int64) for i in range(len(dataset)))
        else:
            documents = (
                np.asarray(tokenizer.tokenize(text) + [tokenizer.eod], dtype=np.int64)
                for text in _documents_from_jsonl(Path(where), args.json_key)
                if text.strip()
            )
        for doc in documents:
            pieces.append(doc)
            total += len(doc)
            if total >= budget:
                break
        stream = np.concatenate(pieces)[:budget] if pieces else np.zeros(0, dtype=np.int64)
        if len(stream) == 0:
            raise UsageError(f"--corpus: language {lang!r} has no text in {where}")
        streams[lang] = stream
    if len(streams) < 2:
        raise UsageError(f"--corpus: need at least two languages, found {sorted(streams)}")
    return streams


def record_routing(model, preset, streams, seq_length: int, micro_batch_size: int):
    import torch
    from tqdm import tqdm

    from megatron_ext.routing import RoutingRecorder

    recorder = RoutingRecorder([model], preset.num_layers, preset.num_experts)
    tokens = {}
    model.eval()
    with torch.no_grad():
        for lang, stream in tqdm(streams.items(), desc="languages", unit="lang"):
            # Whole sequences only; the last, shorter piece runs on its own.
            chunks = [stream[i : i + seq_length] for i in range(0, len(stream), seq_length)]
            with recorder.recording(lang):
                for start in range(0, len(chunks), micro_batch_size):
                    group = chunks[start : start + micro_batch_size]
                    for length in sorted({len(c) for c in group}):
                        batch = torch.as_tensor(np.stack([c for c in group if len(c) == length]))
                        positions = torch.arange(length).expand_as(batch)
                        model(batch, positions, None)
            tokens[lang] = int(len(stream))
    counts = {lang: recorder.counts[lang].numpy() for lang in streams}
    recorder.remove()
    return counts, tokens


def write_outputs(out: str, result, counts: dict, info: dict) -> None:
    """All files into a temporary sibling of --out, renamed into place when complete."""
    from megatron_ext import routing_analysis

    with atomic_directory(out, "routing") as tmp:
        layers = result.layers
        np.savez(
            os.path.join(tmp, "signatures.npz"),
            languages=np.array(result.languages),
            layers=np.array(layers),
            signatures=result.signatures,
            counts=np.stack([counts[lang][layers] for lang in result.languages]),
            tokens=result.tokens,
            correlation=result.correlation,
            entropy_bits=result.entropy,
        )
        Path(tmp, "signatures.csv").write_text(routing_analysis.signatures_csv(result))
        header = "language," + ",".join(result.languages)
        rows = [f"{lang}," + ",".join(f"{v:.6f}" for v in result.correlation[i])
                for i, lang in enumerate(result.languages)]
        Path(tmp, "correlation.csv").write_text("\n".join([header, *rows]) + "\n")
        Path(tmp, "clustering.json").write_text(json.dumps({
            "method": "average linkage on 1 - Pearson r",
            "leaf_order": result.leaf_order,
            "linkage": result.linkage.tolist(),
            "languages": result.languages,
        }, indent=2))
        entropy_rows = ["language," + ",".join(f"layer_{l}" for l in layers) + ",mean"]
        for i, lang in enumerate(result.languages):
            values = result.entropy[i]
            entropy_rows.append(f"{lang}," + ",".join(f"{v:.4f}" for v in values) + f",{values.mean():.4f}")
        Path(tmp, "entropy.csv").write_text("\n".join(entropy_rows) + "\n")
        Path(tmp, "unused_experts.json").write_text(
            json.dumps({str(k): v for k, v in result.unused_experts.items()}, indent=2))
        Path(tmp, "summary.json").write_text(json.dumps(info, indent=2))
        figure = routing_analysis.correlation_figure(result)
        figure.savefig(os.path.join(tmp, "correlation_heatmap.png"), dpi=120)


def run(args) -> int:
    from megatron_ext import checkpointing, parallel, routing_analysis
    from megatron_ext.inference.loading import load_model_from_checkpoint

    ckpt = checkpointing.resolve_checkpoint_dir(args.load)
    info = checkpointing.read_model_info(ckpt)
    preset = checkpointing.preset_from_checkpoint(ckpt)
    if not preset.is_moe:
        raise UsageError(f"--load {args.load}: a dense checkpoint has no routers to analyse")
    checkpointing.verify_checkpoint(ckpt)  # damaged files: one line, before any corpus work
    layers = parse_layers(args.layers, preset.num_layers)
    kind, model_path, tokenizer = _tokenizer(args, info)
    streams = language_token_streams(args, kind, model_path, tokenizer)
    with parallel.single_process(seed=0):
        model, preset = load_model_from_checkpoint(ckpt)
        counts, tokens = record_routing(model, preset, streams, args.seq_length,
                                        args.micro_batch_size)
    result = routing_analysis.analyse({l: c[layers] for l, c in counts.items()}, tokens, layers)
    write_outputs(args.out, result, counts, {
        "checkpoint": os.path.abspath(args.load),
        "preset": preset.name,
        "languages": result.languages,
        "tokens_per_language": dict(zip(result.languages, result.tokens.tolist())),
        "layers": layers,
        "leaf_order": result.leaf_order,
        "mean_entropy_bits": dict(zip(result.languages, result.entropy.mean(axis=1).round(4).tolist())),
        "max_entropy_bits": float(np.log2(preset.num_experts)),
        "unused_experts": sum(len(v) for v in result.unused_experts.values()),
    })
    print(f"wrote routing analysis of {len(result.languages)} languages x {len(layers)} layers to {args.out}")
    print(f"dendrogram order: {' '.join(result.leaf_order)}")
    return 0


def main(argv=None) -> int:
    return run_tool(run, build_parser(), argv, output="out")


if __name__ == "__main__":
    sys.exit(main())
