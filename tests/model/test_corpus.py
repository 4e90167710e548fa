"""The corpus builder: parsing WordNet and fortunes, cleaning, de-duplication, the split."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from retd.model.corpus import (
    MAX_CHARS,
    MIN_CHARS,
    MIN_WORDS,
    build_corpus,
    clean,
    fortune_texts,
    is_heldout,
    read_texts,
    wordnet_texts,
)

WORDNET_SAMPLE = "".join(
    line + "  \n"  # WordNet's data lines end in two spaces
    for line in [
        "  1 This software and database is being provided to you, the LICENSEE, by",
        "  2 Princeton University under the following license.  By obtaining, using",
        "00002724 29 v 01 choke 0 002 @ 00001740 v 0000 + 14058252 n 0101 01 + 02 00 | "
        "breathe with great difficulty, as when experiencing a strong emotion; "
        '"She choked with emotion when she spoke about her deceased husband"',
        "00003316 00 a 01 cellular 0 000 | relating to or consisting of cells; "
        '"cellular walls"; "cellular physiology"',
    ]
)


def test_wordnet_glosses_become_definitions_and_examples(tmp_path: Path) -> None:
    for part in ("noun", "verb", "adj", "adv"):
        (tmp_path / f"data.{part}").write_text(WORDNET_SAMPLE if part == "verb" else "")
    assert list(wordnet_texts(tmp_path)) == [
        "Breathe with great difficulty, as when experiencing a strong emotion.",
        "She choked with emotion when she spoke about her deceased husband",
        "Relating to or consisting of cells.",
        "cellular walls",
        "cellular physiology",
    ]


def test_fortunes_are_split_on_percent_lines_and_indexes_skipped(tmp_path: Path) -> None:
    (tmp_path / "wisdom").write_text("A penny saved\nis a penny earned.\n%\nSecond one here.\n%\n")
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01 binary index")
    texts = [" ".join(t.split()) for t in fortune_texts(tmp_path)]
    assert texts == ["A penny saved is a penny earned.", "Second one here."]


@given(st.text(max_size=260))
def test_cleaning_keeps_only_texts_that_pass_every_rule(raw: str) -> None:
    text = clean(raw)
    if text is None:
        return
    assert MIN_CHARS <= len(text) <= MAX_CHARS
    assert len(text.split()) >= MIN_WORDS
    assert text == " ".join(text.split())  # whitespace normalised
    assert clean(text) == text  # idempotent


def test_cleaning_examples() -> None:
    assert clean("  The   cat\tsat on\nthe mat. ") == "The cat sat on the mat."
    assert clean("too short") is None
    assert clean("two words") is None
    assert clean("1234 5678 9012 3456 !!!!") is None  # not mostly letters
    assert clean("word " * 60) is None  # longer than 200 characters


@given(st.lists(st.text(min_size=1, max_size=80), max_size=60))
def test_built_corpus_is_deduplicated_and_its_split_is_by_text(texts: list[str]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        summary = build_corpus(out, {"wordnet": iter(texts), "fortunes": iter(reversed(texts))})
        train, heldout = read_texts(out / "train.txt"), read_texts(out / "heldout.txt")
        expected = {c for c in map(clean, texts) if c is not None}
        assert set(train) | set(heldout) == expected
        assert len(train) + len(heldout) == len(expected)  # nothing twice
        assert all(is_heldout(t) for t in heldout) and not any(is_heldout(t) for t in train)
        assert summary.per_source["fortunes"] == 0  # all seen already in the first source
        card = json.loads((out / "corpus.json").read_text())
        assert card["sha256"] == summary.sha256 and card["train"] == len(train)


def test_heldout_share_is_about_two_percent() -> None:
    share = sum(is_heldout(f"sentence number {i} of many") for i in range(20_000)) / 20_000
    assert 0.015 < share < 0.025
