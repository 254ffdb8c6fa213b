"""Checks of the shipped corpora in t5x_lite/data/corpora against manifest.json."""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import cache
from pathlib import Path

import pytest

CORPORA_DIR = Path(__file__).parent.parent / "t5x_lite/data/corpora"
SPLITS = ("train", "validation", "test")
FIELDS = {
    "translate_en_de": ("id", "en", "de"),
    "translate_en_fr": ("id", "en", "fr"),
    "translate_en_zh": ("id", "en", "zh"),
    "summarize_debian": ("id", "description", "synopsis"),
    "classify_debian_section": ("id", "description", "section"),
    "sentiment_rt": ("id", "text", "label"),
    "pretrain_text": ("id", "text"),
}
MIN_TRAIN_ROWS = {
    "translate_en_de": 25_000,
    "translate_en_fr": 24_000,
    "translate_en_zh": 16_000,
    "summarize_debian": 50_000,
    "classify_debian_section": 50_000,
    "sentiment_rt": 9_000,
    "pretrain_text": 30_000,
}
MIN_EVAL_ROWS = 300
MAX_FILE_BYTES = 10 * 2**20
MAX_TOTAL_BYTES = 30 * 2**20


@cache
def manifest() -> dict:
    return json.loads((CORPORA_DIR / "manifest.json").read_text(encoding="utf-8"))


@cache
def raw(corpus: str, split: str) -> bytes:
    return (CORPORA_DIR / corpus / f"{split}.jsonl.gz").read_bytes()


@cache
def rows(corpus: str, split: str) -> tuple[dict, ...]:
    lines = gzip.decompress(raw(corpus, split)).decode("utf-8").splitlines()
    return tuple(json.loads(line) for line in lines)


def split_of_ids(corpus: str) -> dict[str, str]:
    return {row["id"]: split for split in SPLITS for row in rows(corpus, split)}


def test_manifest_lists_every_corpus_and_split() -> None:
    assert set(manifest()["corpora"]) == set(FIELDS)
    for corpus, splits in manifest()["corpora"].items():
        assert set(splits) == set(SPLITS), corpus
    assert manifest()["sources"]["debian_packages"]
    assert (CORPORA_DIR / "README.md").is_file()
    assert (CORPORA_DIR / "LICENSES.md").is_file()


@pytest.mark.parametrize("corpus", sorted(FIELDS))
@pytest.mark.parametrize("split", SPLITS)
def test_file_matches_manifest(corpus: str, split: str) -> None:
    entry = manifest()["corpora"][corpus][split]
    assert hashlib.sha256(raw(corpus, split)).hexdigest() == entry["sha256"]
    assert len(rows(corpus, split)) == entry["rows"]
    assert len(raw(corpus, split)) <= MAX_FILE_BYTES


@pytest.mark.parametrize("corpus", sorted(FIELDS))
def test_rows_have_nonempty_string_fields_and_sorted_unique_ids(corpus: str) -> None:
    for split in SPLITS:
        ids = [row["id"] for row in rows(corpus, split)]
        assert ids == sorted(set(ids)), (corpus, split)
        for row in rows(corpus, split):
            assert tuple(row) == FIELDS[corpus], (corpus, split, row)
            assert all(isinstance(v, str) and v.strip() for v in row.values()), row


@pytest.mark.parametrize("corpus", sorted(FIELDS))
def test_no_id_or_input_in_two_splits(corpus: str) -> None:
    input_field = FIELDS[corpus][1]
    seen_ids: set[str] = set()
    seen_inputs: set[str] = set()
    for split in SPLITS:
        ids = {row["id"] for row in rows(corpus, split)}
        inputs = {row[input_field] for row in rows(corpus, split)}
        assert not ids & seen_ids, (corpus, split)
        assert not inputs & seen_inputs, (corpus, split)
        seen_ids |= ids
        seen_inputs |= inputs


@pytest.mark.parametrize("corpus", sorted(FIELDS))
def test_sizes_in_expected_range(corpus: str) -> None:
    assert len(rows(corpus, "train")) >= MIN_TRAIN_ROWS[corpus]
    for split in ("validation", "test"):
        assert len(rows(corpus, split)) >= MIN_EVAL_ROWS, (corpus, split)
        assert len(rows(corpus, split)) < len(rows(corpus, "train")) / 4


def test_total_size_within_budget() -> None:
    total = sum(len(raw(c, s)) for c in FIELDS for s in SPLITS)
    assert total <= MAX_TOTAL_BYTES


def test_same_paragraph_same_split_across_languages() -> None:
    splits = {lang: split_of_ids(f"translate_en_{lang}") for lang in ("de", "fr", "zh")}
    shared = set(splits["de"]) & set(splits["fr"]) & set(splits["zh"])
    assert len(shared) > 10_000
    for par_id in shared:
        assert splits["de"][par_id] == splits["fr"][par_id] == splits["zh"][par_id], par_id


def test_translation_pairs_are_translated() -> None:
    for lang in ("de", "fr", "zh"):
        for row in rows(f"translate_en_{lang}", "test"):
            assert row["en"] != row[lang]
            assert "#par_id" in row["id"] and row["id"].startswith("text/")


def test_summarize_and_classify_share_descriptions_and_splits() -> None:
    for split in SPLITS:
        summarize = {r["id"]: r["description"] for r in rows("summarize_debian", split)}
        classify = {r["id"]: r["description"] for r in rows("classify_debian_section", split)}
        assert summarize == classify, split


def test_sections_are_bare_labels() -> None:
    sections = {r["section"] for r in rows("classify_debian_section", "train")}
    assert {"libs", "python", "devel", "doc"} <= sections
    assert not any("/" in s for s in sections)


def test_sentiment_labels() -> None:
    for split in SPLITS:
        labels = {row["label"] for row in rows("sentiment_rt", split)}
        assert labels == {"positive", "negative"}, split


def test_pretrain_has_every_source() -> None:
    prefixes = {row["id"].split(":", 1)[0] for row in rows("pretrain_text", "train")}
    assert prefixes == {"help", "debian", "pydoc"}


# ---------------------------------------------------------------- the builder (tools/)

REPO = Path(__file__).parent.parent


def test_builder_split_rule_reproduces_the_shipped_splits() -> None:
    from tools import build_corpora

    for corpus, field in (("translate_en_de", "en"), ("summarize_debian", "description")):
        for split in SPLITS:
            for row in rows(corpus, split)[:200]:
                assert build_corpora.split_of(row[field]) == split, (corpus, row["id"])
    # The rule itself, by hand: the first 8 bytes of the SHA-256, big-endian, mod 100.
    bucket = int(hashlib.sha256(b"Hello").hexdigest()[:16], 16) % 100
    expected = "validation" if bucket < 2 else "test" if bucket < 4 else "train"
    assert build_corpora.split_of("Hello") == expected


def test_builder_makes_and_writes_corpora_from_sources(tmp_path: Path) -> None:
    from tools import build_corpora, corpus_sources

    help_text = {
        "en": {f"p{i}": f"English paragraph number {i} with enough words in it" for i in range(40)},
        **{lang: {f"p{i}": f"{lang} paragraph {i}" for i in range(40)} for lang in ("de", "fr", "zh")},
    }
    help_text["de"]["p0"] = help_text["en"]["p0"]  # untranslated: dropped
    packages = [{"id": f"pkg{i}", "description": f"tool number {i} does things\nmore text here",
                 "synopsis": f"tool {i}", "section": "utils"} for i in range(30)]
    sentiment = [{"id": "r1", "text": "good", "label": "positive"},
                 {"id": "r2", "text": "good", "label": "negative"},  # conflicting: dropped
                 {"id": "r3", "text": "bad", "label": "negative"}]
    src = corpus_sources.Sources(help_text, packages, sentiment, {}, {}, "bookworm", "12.0")
    corpora = build_corpora.make_corpora(src)
    assert sum(len(r) for r in corpora["translate_en_de"].values()) == 39
    assert sum(len(r) for r in corpora["translate_en_fr"].values()) == 40
    assert [r["text"] for s in SPLITS for r in corpora["sentiment_rt"][s]] == ["bad"]
    for split, split_rows in corpora["translate_en_fr"].items():
        assert all(build_corpora.split_of(r["en"]) == split for r in split_rows)
    manifest = build_corpora.write_corpora(tmp_path, corpora)
    path = tmp_path / "translate_en_fr" / "train.jsonl.gz"
    assert manifest["translate_en_fr"]["train"]["sha256"] == hashlib.sha256(
        path.read_bytes()).hexdigest()
    written = [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]
    assert written == corpora["translate_en_fr"]["train"]


def test_builder_is_one_command_outside_the_package() -> None:
    import subprocess
    import sys

    assert not (REPO / "t5x_lite/data/build_corpora.py").exists()
    result = subprocess.run([sys.executable, "-m", "tools.build_corpora", "--help"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    assert "--out" in result.stdout
