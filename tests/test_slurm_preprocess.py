"""slurm/preprocess.sh and preprocess.sbatch on a real Slurm (the one-node cluster of
tests/test_slurm_real.py, started for this module; skipped without Slurm unless
MARCO_REQUIRE_SLURM=1): a 3-task job array and its final step give each source the bytes one
process gives; a task killed mid-run leaves no shard, the final step then never runs, and
submitting again runs that task alone."""
from __future__ import annotations

import gzip
import json
import sys
import time

import pytest
from conftest import REPO, load_tool
from test_slurm_real import NEVER_STARTS, _ended, cluster  # noqa: F401  (the module's cluster)

CORPUS = REPO / "data" / "corpus"
JOB_TIMEOUT = 300
# What docs/data.md shows, with the test cluster's small request (1 CPU and 100 MB per task).
SUBMIT = "bash slurm/preprocess.sh {manifest} {out} --cpus-per-task=1 --mem-per-cpu=100M --time=00:10:00"


def _inputs(root):
    """Source 'mixed': a parquet file, then ~5 MB of JSON lines (task 1: long enough to be
    killed mid-run); source 'ja': gzipped JSON lines. -> the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = root / "raw"
    raw.mkdir()
    with gzip.open(CORPUS / "de.train.jsonl.gz", "rt", encoding="utf-8") as f:
        pq.write_table(pa.Table.from_pylist([json.loads(x) for x in f]), raw / "a_de.parquet",
                       row_group_size=16)
    with gzip.open(CORPUS / "fr.train.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(x)["text"] for x in f]
    with open(raw / "b_fr.jsonl", "w", encoding="utf-8") as f:
        for copy in range(16):
            for i, text in enumerate(texts):
                f.write(json.dumps({"text": f"{copy}.{i} {text}"}, ensure_ascii=False) + "\n")
    (raw / "ja.jsonl.gz").write_bytes((CORPUS / "ja.train.jsonl.gz").read_bytes())
    manifest = root / "manifest.yaml"
    manifest.write_text(f"""
tokenizer: {{type: SentencePieceTokenizer, model: {REPO}/data/tokenizer/marco_tiny_spm.model}}
sources:
  mixed: {{inputs: [raw/a_*.parquet, raw/b_*.jsonl], prefix: mixed_text_document}}
  ja: {{inputs: raw/ja.jsonl.gz, prefix: ja_text_document}}
""")
    return manifest


def _submit(cluster, manifest, out) -> tuple[str | None, str]:  # noqa: F811
    text = cluster.run(SUBMIT.format(manifest=manifest, out=out) + f" --output={cluster.root}/%x-%A_%a.out",
                       MARCO_PYTHON=sys.executable).stdout
    array = final = None
    for line in text.splitlines():
        if line.startswith("preprocess.sh: tasks"):
            array = line.rsplit(" ", 1)[1]
        elif line.startswith("preprocess.sh: final step: job"):
            final = line.rsplit(" ", 1)[1]
    assert final, text
    return array, final


def _bytes(prefix) -> bytes:
    return prefix.with_suffix(".bin").read_bytes() + prefix.with_suffix(".idx").read_bytes()


@pytest.mark.slow
def test_job_array_equals_one_process_and_a_killed_task_reruns_alone(cluster, tmp_path):  # noqa: F811
    root = cluster.root
    manifest = _inputs(root)
    out = root / "out"
    array, final = _submit(cluster, manifest, out)

    # Kill task 1 (the 5 MB file) once it writes its temporary shard.
    shard_dir = out / "shards" / "mixed"
    deadline, polls = time.time() + JOB_TIMEOUT, 0
    while not list(shard_dir.glob("00001_text_document.tmp-*.bin")):
        polls += 1
        if polls % 100 == 0:  # every ~2 s: still on its way?
            job = cluster.job(f"{array}_1")
            assert time.time() < deadline and not _ended(job) and job["Reason"] not in NEVER_STARTS, (
                f"{job}\n{cluster.tail()}")
        time.sleep(0.02)
    cluster.run(["scancel", f"{array}_1"])
    for task in (0, 1, 2):
        cluster.wait_job(f"{array}_{task}", _ended, JOB_TIMEOUT, "finished")
    states = {t: cluster.job(f"{array}_{t}")["JobState"] for t in (0, 1, 2)}
    assert states == {0: "COMPLETED", 1: "CANCELLED", 2: "COMPLETED"}, cluster.tail()
    assert not (shard_dir / "00001.done.json").exists(), "task 1 finished before it was killed"
    assert list(shard_dir.glob("00001_text_document.tmp-*")), "the kill left no temporary"
    # The final step waits for every task to succeed: it never runs.
    done = cluster.wait_job(final, _ended, JOB_TIMEOUT, "removed")
    assert done["JobState"] == "CANCELLED" and not (out / "prefixes.yaml").exists()
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.done.json")}
    assert len(kept) == 2

    # Submitted again: task 1 alone, then the final step.
    array2, final2 = _submit(cluster, manifest, out)
    assert cluster.job(array2)["ArrayTaskId"] == "1"
    done = cluster.wait_job(final2, _ended, JOB_TIMEOUT, "finished")
    assert (done["JobState"], done["ExitCode"]) == ("COMPLETED", "0:0"), cluster.tail()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert not list(shard_dir.glob("*.tmp-*"))
    task_log = (root / f"marco-preprocess-{array2}_1.out").read_text()
    assert "task 1/3 (source mixed, shard 1, 1 file(s)): 912 documents" in task_log, task_log
    assert "documents/s" in task_log and "tokens/s" in task_log
    final_log = (root / f"marco-preprocess-final-{final2}_4294967294.out").read_text()
    assert "source mixed: 2 shard(s)" in final_log and "total: 2 source(s)" in final_log, final_log

    # The same bytes per source as one process over the source's files.
    pp = load_tool("preprocess_data")
    raw = root / "raw"
    sources = {"mixed": [raw / "a_de.parquet", raw / "b_fr.jsonl"], "ja": [raw / "ja.jsonl.gz"]}
    for name, inputs in sources.items():
        assert pp.main(["--input", *map(str, inputs), "--output-prefix", str(tmp_path / name),
                        "--append-eod", "--no-progress"]) == 0
        assert _bytes(out / f"{name}_text_document") == _bytes(tmp_path / f"{name}_text_document"), name
