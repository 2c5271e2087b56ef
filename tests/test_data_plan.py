"""tools/data_plan.py: tokens available per source (counted or estimated within the stated
error), tokens each stage draws, epochs; missing data is one line, over-drawing a warning."""
from __future__ import annotations

import gzip
import json
import re

import pytest
from conftest import REPO, load_tool

CORPUS = REPO / "data" / "corpus"
MANIFEST = REPO / "configs" / "data" / "tiny_manifest.yaml"
CURRICULUM = REPO / "configs" / "curriculum" / "tiny.yaml"
data_plan = load_tool("data_plan")


def _table(out: str) -> dict[tuple[str, str], list[str]]:
    """(source, stage) -> the row's cells; a source's later rows carry its name down."""
    rows, source = {}, None
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[4] not in ("epochs", "---:"):
            source = cells[0] or source
            rows[source, cells[2]] = cells
    return rows


def test_tiny_manifest_covers_the_tiny_curriculum(tmp_path, capsys):
    from megatron_ext.data.preprocess import preprocess

    assert data_plan.main([str(MANIFEST), str(CURRICULUM)]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert len({s for s, _ in rows}) == 19 and len(rows) == 15 * 4 + 4 * 2
    # en: counted exactly what preprocessing writes; stage 1 draws 42% of its 480K tokens.
    written = preprocess([CORPUS / "en.train.jsonl.gz"], str(tmp_path / "en"), append_eod=True,
                         progress=False).tokens
    en = _table(out)["en", "stage1"]
    assert en[1] == f"{written:,} (counted)" == "130,081 (counted)"
    assert en[3] == "201,600" and float(en[4]) == pytest.approx(201_600 / 130_081, abs=0.006)
    assert rows["cs", "stage3"][3] == "5,500"  # 100K x 5.5 / 100; cs starts in stage 3
    final = {s: float(c[5]) for (s, st), c in rows.items() if st == "stage4"}
    assert final["en"] == pytest.approx(sum(float(rows["en", f"stage{k}"][4]) for k in (1, 2, 3, 4)),
                                        abs=0.02)
    assert "warning" not in out  # the most drawn, en, is at 2.17 epochs; the default limit is 4
    assert "the curriculum draws 1.02M tokens in 4 stage(s)" in out
    assert data_plan.main([str(MANIFEST), str(CURRICULUM), "--max-epochs", "2"]) == 0
    warned = [x for x in capsys.readouterr().out.splitlines() if x.startswith("warning")]
    assert warned == ["warning: source 'en' is drawn 2.17 epochs over the curriculum "
                      "(more than --max-epochs 2)"]


def test_estimate_from_a_sample_holds_the_truth_within_its_stated_error(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    langs = ["de", "fr", "es", "it", "pt", "nl"]
    for lang in langs[:3]:  # half parquet, half gzipped JSON lines
        with gzip.open(CORPUS / f"{lang}.train.jsonl.gz", "rt", encoding="utf-8") as f:
            pq.write_table(pa.Table.from_pylist([json.loads(x) for x in f]), tmp_path / f"{lang}.parquet")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"""
tokenizer: {{model: {REPO}/data/tokenizer/marco_tiny_spm.model}}
sources:
  web: {{inputs: ["{tmp_path}/*.parquet", {", ".join(f'"{CORPUS}/{x}.train.jsonl.gz"' for x in langs[3:])}],
         prefix: web_text_document}}
""")
    curriculum = tmp_path / "c.yaml"
    curriculum.write_text("sources: {web: web_text_document}\n"
                          "stages: [{name: one, end: 1M, blend: {web: 1}}]\n")
    assert data_plan.main([str(manifest), str(curriculum)]) == 0
    counted = _table(capsys.readouterr().out)["web", "one"][1]
    truth = int(counted.replace(" (counted)", "").replace(",", ""))
    assert data_plan.main([str(manifest), str(curriculum), "--count-below", "0",
                           "--sample-docs", "120", "--sample-files", "4"]) == 0
    cell = _table(capsys.readouterr().out)["web", "one"][1]
    m = re.fullmatch(r"(\S+) ± ([0-9.]+)% \(estimated, (\d+) docs\)", cell)
    assert m, cell
    number = m.group(1).replace(",", "")
    estimate = float(number[:-1]) * 1e6 if number.endswith("M") else float(number)
    error = estimate * float(m.group(2)) / 100
    assert int(m.group(3)) == 120 and 0 < error < 0.5 * estimate
    assert abs(estimate - truth) <= error, (estimate, truth, error)


def test_a_source_without_data_is_one_line(tmp_path, capsys):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"sources:\n  en: {CORPUS}/en.train.jsonl.gz\n  de: {tmp_path}/none/*.parquet\n")
    curriculum = tmp_path / "c.yaml"
    curriculum.write_text("sources: {en: en_text_document, de: de_text_document, fr: fr_text_document}\n"
                          "stages: [{name: one, end: 1000, blend: {en: 1, de: 1}},"
                          " {name: two, end: 2000, blend: {en: 1, fr: 1}}]\n")
    assert data_plan.main([str(manifest), str(curriculum)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: source 'fr' of {curriculum} has no data: not in {manifest}")
    curriculum.write_text("sources: {en: en_text_document, de: de_text_document}\n"
                          "stages: [{name: one, end: 1000, blend: {en: 1, de: 1}}]\n")
    assert data_plan.main([str(manifest), str(curriculum)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {manifest}: source 'de' has no data: no file matches {tmp_path}/none/*.parquet")
