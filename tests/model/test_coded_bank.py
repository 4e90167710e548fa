"""Coded phrase banks (model/coded_bank.py, model/datastore.py): the quantizer's faiss index
scores what its codes reconstruct, a coded search re-scores exactly (with every phrase
re-scored it is the exact search), the shipped codes are found by key and only the texts they
lack are embedded, and `retd compress-bank` / `build-phrase-bank --codes` write a bank that
loads and searches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retd.client.cli import main
from retd.model.checkpoint import CheckpointError
from retd.model.coded_bank import CodedPhraseBank, Quantizer, codes_for, load_shipped, text_keys
from retd.model.phrase_bank import (
    PhraseBank,
    load_phrase_bank,
    save_coded_bank,
    save_phrase_bank,
)

DIM, M, N = 32, 4, 600


def clustered(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    """Unit rows around 12 centres (as sentence embeddings cluster)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim))
    rows = centres[rng.integers(0, 12, n)] + 0.6 * rng.standard_normal((n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


VECTORS = clustered(N, 0)
PHRASES = [f"phrase {i}" for i in range(N)]
QUANTIZER = Quantizer.fit(VECTORS, M, seed=0)
CODES = QUANTIZER.codes(VECTORS)
BY_TEXT = dict(zip(PHRASES, VECTORS, strict=True))


def lookup(texts: list[str]) -> np.ndarray:
    """The phrases' own vectors: what re-embedding them gives here."""
    return np.stack([BY_TEXT[t] for t in texts])


def reconstruct(codes: np.ndarray) -> np.ndarray:
    """What the codes stand for, by hand: each sub-vector's centroid, rotated back."""
    parts = [QUANTIZER.centroids[m][codes[:, m]] for m in range(QUANTIZER.m)]
    return np.concatenate(parts, axis=1) @ QUANTIZER.rotation


queries = st.integers(0, 2**32 - 1).map(lambda seed: clustered(3, seed))


def test_the_quantizer_is_orthogonal_and_codes_come_near() -> None:
    rotation = QUANTIZER.rotation
    assert np.allclose(rotation @ rotation.T, np.eye(DIM), atol=1e-4)
    assert CODES.shape == (N, M) and CODES.dtype == np.uint8
    error = np.linalg.norm(reconstruct(CODES) - VECTORS, axis=1)
    shuffled = np.linalg.norm(reconstruct(CODES[::-1]) - VECTORS, axis=1)
    assert error.mean() < 0.5 * shuffled.mean()  # each code stands for its own vector


@settings(max_examples=25, deadline=None)
@given(queries)
def test_the_index_scores_the_inner_product_with_what_the_codes_stand_for(
    asked: np.ndarray,
) -> None:
    scores, rows = QUANTIZER.index(CODES).search(asked @ QUANTIZER.rotation.T, 10)
    by_hand = asked @ reconstruct(CODES).T  # (3, N)
    assert np.allclose(scores, np.take_along_axis(by_hand, rows, axis=1), atol=1e-4)
    assert np.allclose(scores[:, 0], by_hand.max(axis=1), atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(queries, st.integers(1, 20))
def test_rescoring_every_phrase_is_the_exact_search(asked: np.ndarray, k: int) -> None:
    coded = CodedPhraseBank(PHRASES, QUANTIZER, CODES, lookup, rescore=N)
    exact = PhraseBank(PHRASES, torch.from_numpy(VECTORS))
    got, want = coded.search(torch.from_numpy(asked), k), exact.search(torch.from_numpy(asked), k)
    assert torch.equal(got[1], want[1])
    assert torch.allclose(got[0], want[0], atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(queries, st.integers(1, 40), st.integers(1, 10))
def test_every_score_is_the_exact_cosine_best_first(
    asked: np.ndarray, rescore: int, k: int
) -> None:
    coded = CodedPhraseBank(PHRASES, QUANTIZER, CODES, lookup, rescore=rescore)
    scores, rows = coded.search(torch.from_numpy(asked * 3.0), k)  # any length asked
    assert rows.shape == (3, k) and len(set(rows[0].tolist())) == k  # at least k re-scored
    unit = asked / np.linalg.norm(asked, axis=1, keepdims=True)
    exact = np.einsum("bd,bkd->bk", unit, VECTORS[rows.numpy()])
    assert np.allclose(scores.numpy(), exact, atol=1e-5)
    assert (np.diff(scores.numpy(), axis=1) <= 1e-7).all()


def test_a_few_rescored_find_most_of_the_exact_nearest() -> None:
    asked = clustered(50, 7)
    exact = PhraseBank(PHRASES, torch.from_numpy(VECTORS)).search(torch.from_numpy(asked), 1)[1]
    coded = CodedPhraseBank(PHRASES, QUANTIZER, CODES, lookup, rescore=20)
    found = coded.search(torch.from_numpy(asked), 1)[1]
    assert (found == exact).float().mean() >= 0.8


def test_shipped_codes_are_found_by_key_and_only_new_texts_embedded() -> None:
    keys = text_keys(PHRASES)
    keys[1] = keys[0]  # two shipped phrases under one key: neither code can be trusted
    embedded: list[str] = []

    def encode(texts: list[str]) -> np.ndarray:
        embedded.extend(texts)
        return np.stack([BY_TEXT.get(t, VECTORS[5]) for t in texts])

    mine = [*PHRASES[:300][::-1], *PHRASES[400:], "a text the codes lack"]  # 100 gone, 1 new
    codes, count = codes_for(mine, QUANTIZER, CODES, keys, encode)
    assert sorted(embedded) == sorted(["phrase 0", "phrase 1", "a text the codes lack"])
    assert count == 3
    rows = [PHRASES.index(t) if t in BY_TEXT else 5 for t in mine]
    assert np.array_equal(codes, CODES[rows])


def test_text_keys_are_four_bytes_of_blake2b() -> None:
    import hashlib

    want = int.from_bytes(hashlib.blake2b("héllo".encode(), digest_size=4).digest(), "little")
    assert int(text_keys(["héllo"])[0]) % 2**32 == want
    assert text_keys(["a", "b"]).dtype == np.int32


def test_too_small_a_sample_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 256 sample rows"):
        Quantizer.fit(VECTORS[:100], M)
    with pytest.raises(ValueError, match="at least 768 sample rows"):
        Quantizer.fit(clustered(700, 1, dim=768), 8)
    with pytest.raises(ValueError, match="divisible by m"):
        Quantizer.fit(VECTORS, 5)


def test_compress_then_build_from_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    phrases = [f"phrase {i}" for i in range(1000)]
    vectors = clustered(1000, 3, dim=768)
    bank = save_phrase_bank(tmp_path / "bank", phrases, vectors, name="exact", dtype="float32")
    shipped = tmp_path / "codes"
    argv = ["compress-bank", str(bank), "--out", str(shipped), "--m", "8", "--opq-iterations", "2"]
    assert main(argv) == 0
    quantizer, codes, keys, card = load_shipped(shipped)
    assert codes.shape == (1000, 8) and np.array_equal(keys, text_keys(phrases))
    assert card["phrase_count"] == 1000
    assert card["fit"] == {"sample": 1000, "seed": 0, "opq_iterations": 2}
    assert main(["compress-bank", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2

    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    texts = phrases[100:][::-1]  # the texts a rebuilt corpus holds, in its own order
    corpus.joinpath("train.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "coded"
    argv = ["build-phrase-bank", "--from-split", str(tmp_path / "data"), "--codes", str(shipped)]
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["phrases"] == len(texts) and summary["embedded_here"] == 0

    by_text = dict(zip(phrases, vectors, strict=True))
    loaded = load_phrase_bank(out, encode=lambda ts: np.stack([by_text[t] for t in ts]))
    assert loaded.card["dtype"] == "opq" and loaded.bank.phrases == texts
    scores, rows = loaded.bank.search(torch.from_numpy(vectors[[150, 420]]), 3)
    assert [texts[r] for r in rows[:, 0].tolist()] == ["phrase 150", "phrase 420"]
    assert np.allclose(scores[:, 0].numpy(), 1.0, atol=1e-5)
    assert main(["compress-bank", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "is coded already" in capsys.readouterr().err
    assert main([*argv[:3], "--codes", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "cannot read" in capsys.readouterr().err  # the codes directory
    no_corpus = ["build-phrase-bank", "--from-split", str(tmp_path), "--codes", str(shipped)]
    assert main([*no_corpus, "--out", str(out)]) == 2
    assert "`retd corpus` writes it" in capsys.readouterr().err


def test_a_coded_bank_that_is_not_what_its_card_says_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    wide = Quantizer(np.eye(768, dtype=np.float32), rng.standard_normal((8, 256, 96), "f4"))
    codes = rng.integers(0, 256, (N, 8), dtype=np.uint8)
    bank = save_coded_bank(tmp_path / "bank", PHRASES, wide, codes, name="coded", rescore=5)
    vectors = dict(zip(PHRASES, wide.centroids[np.arange(8), codes].reshape(N, 768), strict=True))
    loaded = load_phrase_bank(bank, encode=lambda ts: np.stack([vectors[t] for t in ts]))
    scores, rows = loaded.bank.search(torch.ones(1, 768), 3)
    assert loaded.card["rescore"] == 5 and rows.shape == (1, 3)

    def refused(match: str) -> None:
        with pytest.raises(CheckpointError, match=match):
            load_phrase_bank(bank, encode=lookup)

    card = json.loads((bank / "card.json").read_text())
    (bank / "card.json").write_text(json.dumps({**card, "rescore": 0}))
    refused("rescore must be a positive integer")
    (bank / "card.json").write_text(json.dumps(card))
    narrow = tmp_path / "narrow"
    save_coded_bank(narrow, PHRASES, QUANTIZER, CODES, name="narrow")
    with pytest.raises(CheckpointError, match="codes 32-dim vectors but encoder"):
        load_phrase_bank(narrow, encode=lookup)
    save_coded_bank(tmp_path / "other", PHRASES, wide, codes[::-1], name="other")
    (bank / "codes.safetensors").write_bytes((tmp_path / "other/codes.safetensors").read_bytes())
    refused("the codes are not the ones the card describes")
    (bank / "codes.safetensors").unlink()
    refused("missing codes.safetensors")
