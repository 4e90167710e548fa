"""Phrase banks: the checkpoint kind, save/load round trip, exact search against numpy, and a
precise CheckpointError for every broken directory."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from retd.model.checkpoint import (
    CARD_FILE,
    KINDS,
    CheckpointError,
    checkpoint_kind,
    init_checkpoint,
    load_checkpoint,
)
from retd.model.embed import load_split
from retd.model.phrase_bank import (
    EMBEDDINGS_FILE,
    PHRASES_FILE,
    load_phrase_bank,
    save_phrase_bank,
)

FIXTURE = Path(__file__).parents[1] / "data" / "embedded"


@pytest.fixture(scope="module")
def fixture_split() -> tuple[list[str], np.ndarray]:
    split = load_split(FIXTURE, "train")
    return split.texts, split.embeddings


@pytest.fixture
def bank_dir(tmp_path: Path, fixture_split: tuple[list[str], np.ndarray]) -> Path:
    texts, embeddings = fixture_split
    return save_phrase_bank(tmp_path / "bank", texts, embeddings, name="fixture")


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, 768)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def numpy_cosines(bank: np.ndarray, query: np.ndarray) -> np.ndarray:
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    return bank @ (query / np.linalg.norm(query))


# ---- the kind on the card ------------------------------------------------------------------


def test_ret_cards_name_their_kind_and_a_card_without_one_is_ret(tmp_path: Path) -> None:
    directory = init_checkpoint(tmp_path / "ret", architecture="ret_tiny")
    card = json.loads((directory / CARD_FILE).read_text())
    assert card["kind"] == "ret" and checkpoint_kind(directory) == "ret"
    del card["kind"]  # a card written before kinds existed
    (directory / CARD_FILE).write_text(json.dumps(card))
    assert checkpoint_kind(directory) == "ret"
    assert load_checkpoint(directory).architecture == "ret_tiny"


def test_an_unknown_kind_lists_the_known_ones(tmp_path: Path) -> None:
    directory = init_checkpoint(tmp_path / "ret", architecture="ret_tiny")
    card = json.loads((directory / CARD_FILE).read_text())
    (directory / CARD_FILE).write_text(json.dumps({**card, "kind": "hnsw"}))
    for load in (checkpoint_kind, load_checkpoint, load_phrase_bank):
        with pytest.raises(CheckpointError, match=r"unknown kind 'hnsw'; known kinds: ret, phrase"):
            load(directory)
    assert KINDS == ("ret", "phrase_bank")


def test_each_loader_refuses_the_other_kind(tmp_path: Path, bank_dir: Path) -> None:
    assert checkpoint_kind(bank_dir) == "phrase_bank"
    with pytest.raises(CheckpointError, match="describes a 'phrase_bank' model, not a 'ret' one"):
        load_checkpoint(bank_dir)
    ret = init_checkpoint(tmp_path / "ret", architecture="ret_tiny")
    with pytest.raises(CheckpointError, match="describes a 'ret' model, not a phrase bank"):
        load_phrase_bank(ret)


# ---- round trip and search -------------------------------------------------------------------


def test_card_contents(bank_dir: Path, fixture_split: tuple[list[str], np.ndarray]) -> None:
    card = json.loads((bank_dir / CARD_FILE).read_text())
    assert card["kind"] == "phrase_bank" and card["name"] == "fixture"
    assert card["phrase_count"] == len(fixture_split[0]) == 192
    assert card["encoder"]["name"] == "sentence-transformers/all-mpnet-base-v2"
    assert card["encoder"]["dim"] == 768
    assert card["encoder"]["weights_sha256"].startswith("78c0197b")
    assert card["dtype"] == "float16"
    loaded = load_phrase_bank(bank_dir)
    assert loaded.card == card and loaded.sha256 == card["weights_sha256"]
    assert loaded.bank.embeddings.dtype == torch.float16
    assert load_phrase_bank(bank_dir, dtype=torch.float32).bank.embeddings.dtype == torch.float32


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_top1_of_a_members_embedding_is_that_member(
    tmp_path: Path, fixture_split: tuple[list[str], np.ndarray], dtype: str
) -> None:
    texts, embeddings = fixture_split
    bank = load_phrase_bank(
        save_phrase_bank(tmp_path / dtype, texts, embeddings, name="b", dtype=dtype)
    ).bank
    scores, rows = bank.search(torch.from_numpy(embeddings.astype(np.float32)), k=1)
    assert [bank.phrases[r] for r in rows[:, 0].tolist()] == texts
    assert torch.allclose(scores[:, 0], torch.ones(len(texts)), atol=2e-3)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 40), scale=st.floats(1e-3, 1e3))
def test_search_gives_numpys_cosines_best_first(seed: int, k: int, scale: float) -> None:
    matrix = unit_rows(30, seed)
    bank_rows = torch.from_numpy(matrix)
    query = np.random.default_rng(seed + 1).standard_normal(768).astype(np.float32) * scale
    with tempfile.TemporaryDirectory() as folder:
        phrases = [f"p{i}" for i in range(30)]
        path = save_phrase_bank(Path(folder), phrases, bank_rows, name="b", dtype="float32")
        bank = load_phrase_bank(path).bank
    scores, rows = bank.search(torch.from_numpy(query)[None], k)
    expected = numpy_cosines(matrix, query)
    assert rows.shape == (1, min(k, 30))
    assert np.all(np.diff(scores[0].numpy()) <= 0)  # best first
    np.testing.assert_allclose(scores[0].numpy(), expected[rows[0].numpy()], atol=1e-5)
    np.testing.assert_allclose(scores[0].numpy(), np.sort(expected)[::-1][: min(k, 30)], atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(phrases=st.lists(st.text(max_size=40), min_size=1, max_size=12))
def test_any_text_round_trips(phrases: list[str]) -> None:
    """Newlines, quotes, surrogate-free unicode, empty strings: phrases come back unchanged."""
    with tempfile.TemporaryDirectory() as folder:
        path = save_phrase_bank(Path(folder), phrases, unit_rows(len(phrases)), name="b")
        assert load_phrase_bank(path).bank.phrases == phrases


def test_rows_are_normalised_when_saved(tmp_path: Path) -> None:
    rows = unit_rows(3) * np.array([[2.0], [0.5], [7.0]], dtype=np.float32)
    bank = load_phrase_bank(save_phrase_bank(tmp_path, ["a", "b", "c"], rows, name="b")).bank
    norms = bank.embeddings.float().norm(dim=1)
    assert torch.allclose(norms, torch.ones(3), atol=1e-3)


@pytest.mark.parametrize(
    ("phrases", "rows", "message"),
    [
        (["a", "b"], unit_rows(3), r"2 phrases need a \(2, 768\) matrix, got shape \(3, 768\)"),
        (["a"], np.ones((1, 5), np.float32), "rows have 5 values but encoder .* embeds into 768"),
        (["a"], np.zeros((1, 768), np.float32), "row 0 is all zeros"),
        (["a", "b"], np.full((2, 768), np.nan, np.float32), "row 0 holds NaN or Inf"),
        ([], np.zeros((0, 768), np.float32), "a bank needs at least one phrase"),
        ([b"bytes"], unit_rows(1), r"phrases\[0\]: expected a str, got bytes"),
    ],
)
def test_save_refuses_bad_input(
    tmp_path: Path, phrases: list[str], rows: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        save_phrase_bank(tmp_path, phrases, rows, name="b")


# ---- loading errors --------------------------------------------------------------------------


def _edit_card(directory: Path, **changes: object) -> None:
    card = json.loads((directory / CARD_FILE).read_text())
    (directory / CARD_FILE).write_text(json.dumps({**card, **changes}))


def _edit_card_without(directory: Path, key: str) -> None:
    card = json.loads((directory / CARD_FILE).read_text())
    card.pop(key)
    (directory / CARD_FILE).write_text(json.dumps(card))


@pytest.mark.parametrize("missing", [CARD_FILE, EMBEDDINGS_FILE, PHRASES_FILE])
def test_a_missing_file_is_named(bank_dir: Path, missing: str) -> None:
    (bank_dir / missing).unlink()
    with pytest.raises(CheckpointError, match=f"missing {missing.replace('.', '[.]')}"):
        load_phrase_bank(bank_dir)


def test_fewer_phrases_than_rows(bank_dir: Path) -> None:
    phrases = json.loads((bank_dir / PHRASES_FILE).read_text())
    (bank_dir / PHRASES_FILE).write_text(json.dumps(phrases[:-1]))
    _edit_card_without(bank_dir, "phrases_sha256")
    with pytest.raises(
        CheckpointError, match="holds 191 phrases but embeddings.safetensors has 192"
    ):
        load_phrase_bank(bank_dir)


def test_phrases_or_embeddings_that_are_not_the_cards(bank_dir: Path) -> None:
    phrases = json.loads((bank_dir / PHRASES_FILE).read_text())
    (bank_dir / PHRASES_FILE).write_text(json.dumps(["changed", *phrases[1:]]))
    with pytest.raises(CheckpointError, match="the phrases are not the ones the card describes"):
        load_phrase_bank(bank_dir)
    (bank_dir / PHRASES_FILE).write_text(json.dumps(phrases))
    tensors = load_file(bank_dir / EMBEDDINGS_FILE)
    save_file(
        {"embeddings": tensors["embeddings"].flip(0).contiguous()}, bank_dir / EMBEDDINGS_FILE
    )
    with pytest.raises(CheckpointError, match="the embeddings are not the ones the card describes"):
        load_phrase_bank(bank_dir)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"embeddings": torch.zeros(192, 384)}, r"shape \(192, 384\); expected \(phrases, 768\)"),
        ({"embeddings": torch.zeros(192, 768, dtype=torch.int8)}, "dtype torch.int8"),
        ({"rows": torch.zeros(192, 768)}, "exactly one tensor, 'embeddings'; has \\['rows'\\]"),
        ({"embeddings": torch.full((192, 768), 0.5)}, r"row 0 has norm 13\.8564.*L2-normalised"),
    ],
)
def test_bad_embeddings_are_described(
    bank_dir: Path, tensors: dict[str, torch.Tensor], message: str
) -> None:
    save_file(tensors, bank_dir / EMBEDDINGS_FILE)
    _edit_card_without(bank_dir, "weights_sha256")
    with pytest.raises(CheckpointError, match=message):
        load_phrase_bank(bank_dir)


def test_a_nan_row_is_named(bank_dir: Path) -> None:
    matrix = load_file(bank_dir / EMBEDDINGS_FILE)["embeddings"].clone()
    matrix[7, 3] = float("nan")
    save_file({"embeddings": matrix}, bank_dir / EMBEDDINGS_FILE)
    _edit_card_without(bank_dir, "weights_sha256")
    with pytest.raises(CheckpointError, match="row 7 holds NaN or Inf"):
        load_phrase_bank(bank_dir)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"phrase_count": 5}, "card.json names 5 phrases but phrases.json holds 192"),
        ({"encoder": {"name": "other", "dim": 384}}, r"expected \(phrases, 384\) for .*'other'"),
        ({"encoder": "mpnet"}, "encoder must be an object with an integer 'dim'"),
        ({"format": "v0"}, "has format 'v0'"),
    ],
)
def test_bad_cards_are_described(bank_dir: Path, changes: dict[str, object], message: str) -> None:
    _edit_card(bank_dir, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_phrase_bank(bank_dir)


def test_a_card_lacking_a_key_names_it(bank_dir: Path) -> None:
    _edit_card_without(bank_dir, "phrase_count")
    with pytest.raises(CheckpointError, match="lacks the key 'phrase_count'"):
        load_phrase_bank(bank_dir)


def test_phrases_that_are_not_a_list_of_strings(bank_dir: Path) -> None:
    (bank_dir / PHRASES_FILE).write_text(json.dumps({"a": 1}))
    _edit_card_without(bank_dir, "phrases_sha256")
    with pytest.raises(CheckpointError, match="must hold a JSON list of strings"):
        load_phrase_bank(bank_dir)
    (bank_dir / PHRASES_FILE).write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointError, match="cannot read .*phrases.json"):
        load_phrase_bank(bank_dir)
