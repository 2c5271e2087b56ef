#!/usr/bin/env python3
"""Regenerate the bundled multilingual sample corpus (data/corpus/) from Debian packages.

Source: the manual pages packaged by Debian (English `manpages`, the translated
`manpages-<lang>` packages). Each man page is rendered to plain text with man-db/groff,
cleaned, deduplicated and written as JSON lines {"text", "lang", "source", "copyright"},
split per language into a train and a held-out valid file. Real text, nothing generated.

Deterministic for a given set of package versions: pages are picked in sha1(path) order,
gzip files carry no timestamp. Needs `apt-get`, `dpkg-deb` and `man` (Debian/Ubuntu).

    python tools/make_sample_corpus.py --output-dir data/corpus
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from megatron_ext.data.jsonl import gz_jsonl, gzip_bytes  # noqa: E402

# Marco language code -> (Debian package, man page root inside the package).
LANGUAGES = {
    "en": ("manpages", "usr/share/man"),
    "cs": ("manpages-cs", "usr/share/man/cs"),
    "de": ("manpages-de", "usr/share/man/de"),
    "el": ("manpages-el", "usr/share/man/el"),
    "es": ("manpages-es", "usr/share/man/es"),
    "fr": ("manpages-fr", "usr/share/man/fr"),
    "hu": ("manpages-hu", "usr/share/man/hu"),
    "id": ("manpages-id", "usr/share/man/id"),
    "it": ("manpages-it", "usr/share/man/it"),
    "ja": ("manpages-ja", "usr/share/man/ja"),
    "nl": ("manpages-nl", "usr/share/man/nl"),
    "pl": ("manpages-pl", "usr/share/man/pl"),
    "pt": ("manpages-pt-br", "usr/share/man/pt_BR"),
    "ro": ("manpages-ro", "usr/share/man/ro"),
    "ru": ("manpages-ru", "usr/share/man/ru"),
    "tr": ("manpages-tr", "usr/share/man/tr"),
    "uk": ("manpages-uk", "usr/share/man/uk"),
    "vi": ("manpages-vi", "usr/share/man/vi"),
    "zh": ("manpages-zh", "usr/share/man/zh_CN"),
}
# Very wide lines: groff then emits one line per paragraph instead of hard-wrapped text.
MAN_ENV = {"MANWIDTH": "1000", "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin", "MANPAGER": "cat"}
MIN_DOC_CHARS = 300
_RULE_RE = re.compile(r"^\s*[\u2500-\u257f=_+|-]{3,}[\s\u2500-\u257f=_+|-]*$")
_COPYRIGHT_RE = re.compile(r"^['.]\\\"\s*(.*(?:Copyright|\(C\)|©|SPDX-License-Identifier).*)$", re.I)


def fail(msg: str) -> None:
    print(f"error: make_sample_corpus: {msg}", file=sys.stderr)
    sys.exit(2)


def download(packages: list[str], dest: Path) -> dict[str, Path]:
    """apt-get download each package into dest; return package -> .deb path."""
    missing = [p for p in packages if not list(dest.glob(f"{p}_*.deb"))]
    if missing:
        r = subprocess.run(["apt-get", "download", *missing], cwd=dest, capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"apt-get download {' '.join(missing)} failed (run 'apt-get update' first?): "
                 f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    debs = {}
    for p in packages:
        found = sorted(dest.glob(f"{p}_*.deb"))
        if not found:
            fail(f"package {p}: no .deb in {dest}")
        debs[p] = found[-1]
    return debs


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True,
                          text=True, check=True).stdout.strip()


def list_pages(root: Path) -> list[Path]:
    """Regular man page files under root/man*/ (symlinks and .so stubs are aliases: skipped)."""
    pages = []
    for sec in sorted(root.glob("man[1-8]")):
        for f in sorted(sec.iterdir()):
            if f.is_symlink() or not f.is_file():
                continue
            with gzip.open(f, "rt", encoding="utf-8", errors="replace") as fh:
                head = [ln for ln in fh.read(4096).splitlines() if not ln.startswith(('.\\"', "'\\\""))]
            if head and head[0].startswith(".so "):
                continue
            pages.append(f)
    return pages


def copyright_lines(page: Path) -> list[str]:
    """Copyright / licence notices from the roff comments (lost when rendering to text)."""
    with gzip.open(page, "rt", encoding="utf-8", errors="replace") as fh:
        return [m.group(1).strip() for ln in fh if (m := _COPYRIGHT_RE.match(ln.rstrip()))]


def render(page: Path) -> str | None:
    r = subprocess.run(["man", "--nh", "--nj", "-E", "UTF-8", "-l", str(page)],
                       capture_output=True, env=MAN_ENV)
    if r.returncode != 0:
        return None
    return clean(r.stdout.decode("utf-8", errors="replace"))


def clean(text: str) -> str:
    text = re.sub(".\x08", "", text)  # overstrike bold/underline, if any
    text = text.replace("\u2010", "-").replace("\u2212", "-").replace("\ufffd", "")
    lines = [ln.rstrip() for ln in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    lines = lines[1:-1]  # running header "LS(1) ..." and footer "GNU coreutils 9.1 ... LS(1)"
    out = []
    for ln in lines:
        if ln and _RULE_RE.match(ln):
            continue  # table rules: at MANWIDTH=1000 they are 1000 box-drawing characters
        indent = len(ln) - len(ln.lstrip(" "))
        # man's base body indent carries no information; wide table gaps are capped.
        out.append(re.sub(r"(?<=\S) {9,}", " " * 8, ln[min(indent, 7):]))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def truncate(text: str, max_bytes: int) -> str:
    """Cut at the last paragraph (else line) boundary that fits in max_bytes of UTF-8."""
    if len(text.encode()) <= max_bytes:
        return text
    head = text.encode()[:max_bytes].decode("utf-8", errors="ignore")
    cut = head.rfind("\n\n")
    if cut < max_bytes // 4:
        cut = head.rfind("\n")
    return head[:cut].rstrip() if cut > 0 else head


def build(args) -> None:
    langs = args.languages or list(LANGUAGES)
    unknown = [lang for lang in langs if lang not in LANGUAGES]
    if unknown:
        fail(f"--languages: unknown {unknown}; known: {sorted(LANGUAGES)}")
    out_dir = Path(args.output_dir)
    work = Path(tempfile.mkdtemp(prefix="marco-corpus-"))
    try:
        debs_dir = Path(args.debs_dir) if args.debs_dir else work
        debs_dir.mkdir(parents=True, exist_ok=True)
        packages = sorted({LANGUAGES[lang][0] for lang in langs})
        debs = download(packages, debs_dir)
        versions = {p: deb_field(d, "Version") for p, d in debs.items()}
        # Source package (e.g. manpages-l10n) names the shared copyright file.
        sources = {p: deb_field(d, "Source").split(" ")[0] or p for p, d in debs.items()}
        for p, d in debs.items():
            subprocess.run(["dpkg-deb", "-x", str(d), str(work / p)], check=True)

        stage = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        (stage / "licenses").mkdir(parents=True)
        manifest = {"source": "Debian manual pages (see README.md)", "render": "man-db/groff, "
                    f"MANWIDTH={MAN_ENV['MANWIDTH']}", "packages": versions, "languages": {}}
        seen: set[str] = set()
        pool = cf.ThreadPoolExecutor(max_workers=args.workers)
        for lang in tqdm(langs, desc="languages", unit="lang", disable=None):
            pkg, sub = LANGUAGES[lang]
            root = work / pkg / sub
            pages = sorted(list_pages(root), key=lambda p: hashlib.sha1(
                str(p.relative_to(work / pkg)).encode()).hexdigest())
            docs, total = [], 0
            for i in range(0, len(pages), 8):
                if total >= args.bytes_per_lang:
                    break
                batch = pages[i:i + 8]
                for page, text in zip(batch, pool.map(render, batch)):
                    if not text or len(text) < MIN_DOC_CHARS or total >= args.bytes_per_lang:
                        continue
                    text = truncate(text, args.max_doc_bytes)
                    digest = hashlib.sha1(text.encode()).hexdigest()
                    if digest in seen:
                        continue
                    seen.add(digest)
                    rel = page.relative_to(work / pkg)
                    docs.append({"text": text, "lang": lang, "source": f"{pkg} {versions[pkg]} {rel}",
                                 "copyright": copyright_lines(page)})
                    total += len(text.encode())
            if len(docs) < 2:
                fail(f"{pkg}: only {len(docs)} usable pages for '{lang}', need 2 (train + valid)")
            valid = [d for j, d in enumerate(docs) if j % args.valid_every == args.valid_every - 1]
            if not valid:
                valid = [docs[-1]]
            train = [d for d in docs if not any(d is v for v in valid)]
            stats = {}
            for split, recs in (("train", train), ("valid", valid)):
                blob = gz_jsonl(recs)
                name = f"{lang}.{split}.jsonl.gz"
                (stage / name).write_bytes(blob)
                stats[split] = {"docs": len(recs), "text_bytes": sum(len(r["text"].encode()) for r in recs),
                                "file_bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
            manifest["languages"][lang] = {"package": pkg, **stats}
        pool.shutdown()
        # Licences: one copy per distinct Debian copyright file.
        by_hash: dict[str, str] = {}
        for pkg in packages:
            data = (work / pkg / "usr/share/doc" / pkg / "copyright").read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest not in by_hash:
                by_hash[digest] = f"licenses/{sources[pkg]}.copyright.gz"
                (stage / by_hash[digest]).write_bytes(gzip_bytes(data))
            manifest.setdefault("copyright_files", {})[pkg] = by_hash[digest]
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        # Swap generated files into place (README.md and other hand-written files stay).
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "licenses").mkdir(exist_ok=True)
        for old in list(out_dir.glob("*.jsonl.gz")) + list((out_dir / "licenses").glob("*.gz")):
            old.unlink()
        for f in sorted(stage.rglob("*")):
            if f.is_file():
                os.replace(f, out_dir / f.relative_to(stage))
        shutil.rmtree(stage, ignore_errors=True)
        total_file = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
        print(f"wrote {out_dir}: {len(langs)} languages, {total_file / 1e6:.2f} MB on disk")
        for lang, s in manifest["languages"].items():
            print(f"  {lang}: train {s['train']['docs']} docs {s['train']['text_bytes']} B, "
                  f"valid {s['valid']['docs']} docs {s['valid']['text_bytes']} B")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    from megatron_ext.cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--output-dir", default=str(Path(__file__).resolve().parents[1] / "data" / "corpus"),
                   help="where the <lang>.{train,valid}.jsonl.gz files and manifest.json go")
    p.add_argument("--languages", nargs="*", help="subset of language codes (default: all)")
    p.add_argument("--bytes-per-lang", type=int, default=400_000,
                   help="stop adding pages to a language past this many UTF-8 bytes of text")
    p.add_argument("--max-doc-bytes", type=int, default=20_000,
                   help="truncate a page at a paragraph boundary past this many bytes")
    p.add_argument("--valid-every", type=int, default=10, help="every N-th page goes to valid")
    p.add_argument("--debs-dir",
                   help="reuse/keep downloaded .deb files here (default: a temporary directory)")
    p.add_argument("--workers", type=int, default=2, help="parallel man renderers")
    build(p.parse_args(argv))


if __name__ == "__main__":
    main()
