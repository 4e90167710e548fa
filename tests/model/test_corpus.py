"""The corpus builder: parsing WordNet and fortunes, cleaning, de-duplication, the split."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import example, given, settings
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


@settings(deadline=None)  # it writes files: slow on a loaded machine, not wrong
@given(st.lists(st.text(min_size=1, max_size=80), max_size=60))
@example(["00AAAA A A", "00AAAA A À"])  # one source kept both: no cap (it capped it to one)
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


def test_ood_source_goes_whole_to_ood_and_labels_follow_every_line(tmp_path: Path) -> None:
    from retd.model.corpus import read_sources

    docs = [f"The docs sentence number {i} is here." for i in range(200)]
    wiki = [f"The encyclopedia sentence number {i} is here." for i in range(200)]
    summary = build_corpus(
        tmp_path, {"wiki": iter(wiki), "docs": iter(docs + wiki[:5])}, ood="docs", max_share=1.0
    )
    ood, heldout = read_texts(tmp_path / "ood.txt"), read_texts(tmp_path / "heldout.txt")
    assert ood == docs + wiki[:5]  # the ood source is read first: it keeps shared texts
    assert read_sources(tmp_path, "ood") == ["docs"] * len(ood)
    assert read_sources(tmp_path, "heldout") == ["wiki"] * len(heldout)
    assert not set(ood) & set(read_texts(tmp_path / "train.txt"))
    card = json.loads((tmp_path / "corpus.json").read_text())
    assert card["ood_source"] == "docs" and card["ood"] == len(ood) == summary.ood
    assert card["sources"]["wiki"]["kept"] == 195
    assert card["sources"]["wiki"]["heldout"] == len(heldout)
    assert card["sources"]["docs"]["ood"] == len(ood)


def test_a_dominant_source_is_capped_by_hash(tmp_path: Path) -> None:
    big = [f"A big source sentence number {i}." for i in range(900)]
    small = [f"A small source sentence number {i}." for i in range(100)]
    summary = build_corpus(tmp_path, {"big": iter(big), "small": iter(small)}, max_share=0.5)
    assert summary.per_source == {"big": 500, "small": 100}
    assert summary.capped == {"big": 900}


def test_every_registered_source_has_kind_licence_and_package() -> None:
    from retd.model.corpus import OOD_SOURCE, SOURCES

    kinds = {s.kind for s in SOURCES.values()}
    assert {"encyclopedic", "technical documentation", "dialogue", "definitions"} <= kinds
    assert all(s.licence and (s.debian or s.pypi) for s in SOURCES.values())
    others = [s for s in SOURCES.values() if s.name != OOD_SOURCE]
    assert SOURCES[OOD_SOURCE].kind in {s.kind for s in others}  # a fair ood test


def test_embed_order_and_a_missing_split(tmp_path: Path) -> None:
    import numpy as np

    from retd.model.embed import embed_corpus, load_split

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, n in (("train", 5), ("heldout", 2), ("ood", 3)):
        (corpus / f"{split}.txt").write_text("".join(f"{split} text {i}\n" for i in range(n)))
    seen: list[str] = []

    def encode(texts: object) -> np.ndarray:
        seen.extend(t.split()[0] for t in texts)  # type: ignore[attr-defined]
        return np.ones((len(texts), 768), np.float32)  # type: ignore[arg-type]

    assert embed_corpus(tmp_path, encode, shard_size=2, progress=False) == {
        "heldout": 1, "ood": 2, "train": 3
    }  # fmt: skip
    # held-out, the first shard of ood's order (enough to evaluate on), train, the rest of ood
    assert seen == ["heldout"] * 2 + ["ood"] * 2 + ["train"] * 5 + ["ood"]
    assert load_split(tmp_path, "ood").texts == [f"ood text {i}" for i in range(3)]
    (corpus / "ood.txt").unlink()
    assert "ood" not in embed_corpus(tmp_path, encode, shard_size=2, progress=False)


@given(n_shards=st.integers(1, 300), start=st.integers(0, 1000))
def test_a_rotated_shard_order_embeds_unseen_shards_first(n_shards: int, start: int) -> None:
    """`retd embed --start-shard K`: the same shards, the order's K-th first (wrapping)."""
    from retd.model.embed import shard_order

    order, rotated = shard_order(n_shards), shard_order(n_shards, start)
    assert sorted(rotated) == list(range(n_shards))
    k = start % n_shards
    assert rotated[: n_shards - k] == order[k:] and rotated[n_shards - k :] == order[:k]


def test_embed_start_shard_reaches_the_train_split_only(tmp_path: Path) -> None:
    import numpy as np

    from retd.model.embed import embed_corpus, shard_order

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, n in (("train", 8), ("heldout", 4)):
        (corpus / f"{split}.txt").write_text("".join(f"{split} {i}\n" for i in range(n)))
    seen: list[str] = []

    def encode(texts: object) -> np.ndarray:
        seen.extend(texts)  # type: ignore[arg-type]
        return np.ones((len(texts), 768), np.float32)  # type: ignore[arg-type]

    embed_corpus(tmp_path, encode, shard_size=2, progress=False, start_shard=3)
    first = [f"heldout {i}" for k in shard_order(2) for i in (2 * k, 2 * k + 1)]
    then = [f"train {i}" for k in shard_order(4, 3) for i in (2 * k, 2 * k + 1)]
    assert seen == first + then
