"""A manifest preprocessed as independent shards (one Slurm array task each), then merged.

Layout under the output directory (the curriculum's data root):
    shards/SOURCE/NNNNN_KEY_document.bin/.idx   shard NNNNN of SOURCE (its files, in order)
    shards/SOURCE/NNNNN.done.json               the shard's record, written last
    PREFIX.bin/.idx                             SOURCE's shards merged (the manifest's prefix)
    prefixes.yaml                               per source: prefix, documents, tokens, bytes,
                                                its shards, and a Megatron --data-path list

`run_task` is one array task: it skips a finished shard, else removes what a killed run of the
same task left (temporary names), tokenizes its files through data/preprocess.py (temporary
names, renamed when complete) and writes the record. A shard is finished when its record exists,
names the same input hash (paths and sizes of its files, the text key, --append-eod and the
tokenizer's content hash) and the .bin/.idx have the recorded sizes. `pending` lists the tasks
still to run (slurm/preprocess.sh submits only those), so a re-run does only what a killed or
failed task left undone.

`finalize` merges each source's shards in order with Megatron-Core's
`IndexedDatasetBuilder.add_index`, Megatron-LM's tools/merge_datasets.py semantics: the merged
dataset is byte-identical to one process over all of the source's files. A source whose shards
did not change since the last merge is not merged again.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import time

from megatron_ext.data.errors import DataConfigError
from megatron_ext.data.indexed import IndexedOutputs, check_indexed_dataset
from megatron_ext.data.manifest import Manifest, Shard
from megatron_ext.data.preprocess import preprocess
from megatron_ext.data.tokenizer import tokenizer_info

_FORMAT = 1  # bump when a shard's bytes would change for the same inputs


def shard_prefix(out_dir: str, shard: Shard) -> str:
    return os.path.join(out_dir, "shards", shard.source, f"{shard.part:05d}")


def record_path(out_dir: str, shard: Shard) -> str:
    return shard_prefix(out_dir, shard) + ".done.json"


def _size(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def input_hash(manifest: Manifest, shard: Shard) -> str:
    tok = tokenizer_info(manifest.tokenizer_type, manifest.tokenizer_model)
    doc = {"format": _FORMAT, "inputs": [[p, _size(p)] for p in shard.inputs],
           "json_key": shard.json_key, "append_eod": manifest.append_eod,
           "tokenizer": [tok["tokenizer_type"], tok["sha256"]]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def finished(manifest: Manifest, out_dir: str, shard: Shard, digest: str | None = None) -> dict | None:
    """The shard's record if the shard is finished (see the module docstring), else None."""
    try:
        with open(record_path(out_dir, shard)) as f:
            rec = json.load(f)
        prefix = os.path.join(out_dir, rec["prefix"])
        sizes = (os.path.getsize(prefix + ".bin"), os.path.getsize(prefix + ".idx"))
    except (OSError, ValueError, KeyError):
        return None
    if sizes != (rec["bin_bytes"], rec["idx_bytes"]):
        return None
    if rec["inputs_sha256"] != (digest or input_hash(manifest, shard)):
        return None
    return rec


def pending(manifest: Manifest, out_dir: str) -> list[int]:
    return [s.index for s in manifest.shards() if finished(manifest, out_dir, s) is None]


def array_spec(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (sbatch --array)."""
    parts, i = [], 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        parts.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
        i = j + 1
    return ",".join(parts)


def run_task(manifest: Manifest, out_dir: str, index: int, *, workers: int = 1,
             progress: bool = False, log=print) -> dict:
    """Array task `index`: tokenize its shard unless finished; returns the shard's record."""

    shards = manifest.shards()
    if not 0 <= index < len(shards):
        raise DataConfigError(f"--task {index}: {manifest.path} has tasks 0-{len(shards) - 1}")
    shard = shards[index]
    what = (f"task {index}/{len(shards)} (source {shard.source}, shard {shard.part}, "
            f"{len(shard.inputs)} file(s))")
    digest = input_hash(manifest, shard)
    rec = finished(manifest, out_dir, shard, digest)
    if rec is not None:
        log(f"{what}: finished before ({rec['tokens']:,} tokens in {rec['prefix']}), skipped")
        return rec
    prefix = shard_prefix(out_dir, shard)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    for stale in glob.glob(glob.escape(prefix) + "*.tmp-*"):  # a killed run's leftovers
        os.remove(stale)
    stats = preprocess(list(shard.inputs), prefix, tokenizer_type=manifest.tokenizer_type,
                       tokenizer_model=manifest.tokenizer_model, json_keys=(shard.json_key,),
                       append_eod=manifest.append_eod, workers=workers, progress=progress)
    (written,) = stats.outputs.values()
    rec = {"task": index, "source": shard.source, "part": shard.part, "inputs": list(shard.inputs),
           "inputs_sha256": digest, "prefix": os.path.relpath(written, out_dir),
           "documents": stats.documents, "tokens": stats.tokens,
           "bin_bytes": os.path.getsize(written + ".bin"),
           "idx_bytes": os.path.getsize(written + ".idx"), "seconds": round(stats.seconds, 3)}
    _write_atomic(record_path(out_dir, shard), json.dumps(rec, indent=1) + "\n")
    log(f"{what}: {stats.documents:,} documents, {stats.tokens:,} tokens in {stats.seconds:.2f} s: "
        f"{stats.per_second(stats.documents):,.0f} documents/s, "
        f"{stats.per_second(stats.tokens):,.0f} tokens/s, {workers} worker(s) -> {rec['prefix']}")
    return rec


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def finalize(manifest: Manifest, out_dir: str, *, merge: bool = True, log=print) -> dict:
    """Merge every source's shards (unless `merge` is False) and write prefixes.yaml; returns
    its content. Stops with one line if a task has not finished."""
    import yaml

    shards = manifest.shards()
    records = {s.index: finished(manifest, out_dir, s) for s in shards}
    missing = [i for i, r in records.items() if r is None]
    if missing:
        raise DataConfigError(
            f"{out_dir}: {len(missing)} of {len(shards)} task(s) not finished "
            f"({array_spec(missing)}): run them again (bash slurm/preprocess.sh submits only those)")
    listing_path = os.path.join(out_dir, "prefixes.yaml")
    before = {}
    if os.path.isfile(listing_path):
        with open(listing_path) as f:
            before = (yaml.safe_load(f) or {}).get("sources", {})
    listing = {}
    t0 = time.perf_counter()
    for name, src in manifest.sources.items():
        recs = [records[s.index] for s in shards if s.source == name]
        entry = {
            "documents": sum(r["documents"] for r in recs), "tokens": sum(r["tokens"] for r in recs),
            "bytes": sum(r["bin_bytes"] for r in recs),
            "shards_sha256": hashlib.sha256(" ".join(r["inputs_sha256"] for r in recs).encode()).hexdigest(),
            "shards": [{"prefix": r["prefix"], "documents": r["documents"], "tokens": r["tokens"],
                        "bytes": r["bin_bytes"]} for r in recs],
            "data_path": " ".join(f"{r['tokens']} {r['prefix']}" for r in recs),
        }
        if merge:
            entry = {"prefix": src.prefix, **entry}
            _merge(out_dir, src.prefix, [r["prefix"] for r in recs], before.get(name), entry)
        listing[name] = entry
        log(f"source {name}: {len(recs)} shard(s), {entry['documents']:,} documents, "
            f"{entry['tokens']:,} tokens, {entry['bytes'] / 1e6:,.2f} MB"
            + (f" -> {src.prefix}" if merge else ""))
    total = sum(e["tokens"] for e in listing.values())
    log(f"total: {len(listing)} source(s), {sum(e['documents'] for e in listing.values()):,} "
        f"documents, {total:,} tokens ({time.perf_counter() - t0:.1f} s)")
    doc = {"manifest": os.path.abspath(manifest.path), "sources": listing}
    _write_atomic(listing_path, "# Written by tools/preprocess_data.py --finalize; prefixes are "
                  "relative to this directory.\n" + yaml.safe_dump(doc, sort_keys=False))
    return doc


def _merge(out_dir: str, prefix: str, parts: list[str], before: dict | None, entry: dict) -> None:
    """`parts` (relative prefixes) concatenated into `prefix`, written under temporary names."""

    final = os.path.join(out_dir, prefix)
    if (before and before.get("shards_sha256") == entry["shards_sha256"]
            and before.get("prefix") == prefix and os.path.isfile(final + ".idx")
            and os.path.isfile(final + ".bin") and os.path.getsize(final + ".bin") == entry["bytes"]):
        return  # merged before from the same shards
    paths = [os.path.join(out_dir, p) for p in parts]
    dtype = check_indexed_dataset(paths[0], f"{out_dir}: shard").dtype
    os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
    with IndexedOutputs() as outputs:
        builder = outputs.add(prefix, final, dtype.type)
        for path in paths:
            builder.add_index(path)
        outputs.finalize()
        outputs.publish()
