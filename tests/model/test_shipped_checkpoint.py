"""The trained RET v2.1 shipped in the package: its card matches its weights, its figures
are reproduced on a slice of the held-out split, and `retd serve` serves it by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retd.client import Client
from retd.model.checkpoint import DEFAULT_CHECKPOINT, LoadedModel, load_checkpoint
from retd.model.evaluate import greedy_texts, text_scores, token_accuracy
from tests.conftest import start_server

HEAD = Path(__file__).parents[1] / "data" / "heldout_head"  # the split's first 100 texts


@pytest.fixture(scope="module")
def shipped() -> LoadedModel:
    return load_checkpoint(DEFAULT_CHECKPOINT, device="cpu")  # checks the weights' sha256


@pytest.fixture(scope="module")
def head() -> tuple[list[str], torch.Tensor]:
    texts = (HEAD / "corpus/heldout.txt").read_text().splitlines()
    embeddings = np.load(HEAD / "embeddings/heldout/shard-00000.npy").astype(np.float32)
    return texts, torch.from_numpy(embeddings)


def test_the_card_describes_a_trained_ret_v21(shipped: LoadedModel) -> None:
    model, card = shipped.model, shipped.card
    assert card["trained"] is True and card["architecture"] == "ret_v21"
    assert model.num_parameters() == 722_944
    assert card["encoder"]["name"] == "sentence-transformers/all-mpnet-base-v2"
    assert card["encoder"]["weights_sha256"].startswith("78c0197b")
    corpus = card["training"]["corpus"]
    assert corpus["train"] > 100_000 and len(corpus["sha256"]) == 64
    assert card["training"]["steps"] > 0 and card["training"]["texts"] > 0
    evaluation = card["metrics"]["eval"]
    for mode in ("greedy", "beam4", "retrieval"):
        assert {"chrf", "bleu", "exact_match", "cosine"} <= set(evaluation[mode]), mode


def test_the_cards_examples_are_what_the_weights_decode(
    shipped: LoadedModel, head: tuple[list[str], torch.Tensor]
) -> None:
    """`retd eval` scored the held-out split from its start: its recorded greedy outputs are
    reproduced exactly by these weights from the same embeddings."""
    model, card = shipped.model, shipped.card
    texts, embeddings = head
    examples = card["metrics"]["eval"]["examples"]
    assert [e["reference"] for e in examples] == texts[: len(examples)]
    decoded = greedy_texts(
        model, embeddings[: len(examples)], model.config.max_length - 1, tokenizer=shipped.tokenizer
    )
    assert decoded == [e["greedy"] for e in examples]


def test_the_cards_figures_hold_on_a_slice(
    shipped: LoadedModel, head: tuple[list[str], torch.Tensor]
) -> None:
    model, card, tokenizer = shipped.model, shipped.card, shipped.tokenizer
    texts, embeddings = head
    evaluation = card["metrics"]["eval"]
    decoded = greedy_texts(model, embeddings, model.config.max_length - 1, tokenizer=tokenizer)
    chrf = text_scores(decoded, texts)["chrf"]
    assert abs(chrf - evaluation["greedy"]["chrf"]) < 10, (chrf, evaluation["greedy"])
    accuracy, _ = token_accuracy(model, embeddings, texts, tokenizer)
    recorded = evaluation.get("token_accuracy", evaluation.get("byte_accuracy"))
    assert abs(accuracy - recorded) < 5, (accuracy, evaluation)


def test_serve_with_no_model_serves_the_shipped_checkpoint(
    tmp_path: Path, shipped: LoadedModel, head: tuple[list[str], torch.Tensor]
) -> None:
    model, card = shipped.model, shipped.card
    texts, embeddings = head
    running = start_server(tmp_path, [])
    try:
        with Client(running.address, timeout=60) as client:
            info = client.model_info()
            assert info.trained and info.name == "ret_v21" and info.version == card["version"]
            answer = client.decode(embeddings[0].numpy()).text
        full = model.config.max_length - 1
        assert answer == greedy_texts(model, embeddings[:1], full, tokenizer=shipped.tokenizer)[0]
    finally:
        assert running.stop() == 0
    assert "UNTRAINED" not in running.log()
