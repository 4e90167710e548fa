"""A coded phrase bank (model/coded_bank.py: 32-byte codes, its candidates re-embedded) with an
editor, served by the real daemon with the real encoder: Generate's candidates are the coded
search's (exact cosines, best first), Decode answers what the editor picks offline from that
search, and the card says the bank is coded."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from retd.client import Client
from retd.model.bank_editor import load_editor
from retd.model.coded_bank import Quantizer
from retd.model.embed import load_split
from retd.model.encoder import SentenceEncoder
from retd.model.phrase_bank import LoadedPhraseBank, load_phrase_bank, save_coded_bank
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, start_server
from tests.server.phrase_bank.conftest import FIXTURE, MEMBERS, TEXTS, as_pb

POINTER = Path(__file__).parents[3] / "model/checkpoints/ret_v21_bpe1792_pointer"
CODED = "coded"
K, RESCORE = 3, 8
ASKED = load_split(FIXTURE, "heldout").embeddings[:8].astype(np.float32)


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from retd.client.cli import main

    # 192 phrases are too few to fit 256 centroids a sub-vector on: fit on them and noisy
    # copies (the codes are the phrases' own)
    rng = np.random.default_rng(0)
    noisy = np.repeat(MEMBERS, 5, axis=0) + 0.02 * rng.standard_normal((5 * len(MEMBERS), 768))
    sample = np.concatenate([MEMBERS, noisy / np.linalg.norm(noisy, axis=1, keepdims=True)])
    quantizer = Quantizer.fit(sample, 32, opq_iterations=2)
    folder = tmp_path_factory.mktemp("coded_bank")
    bank = save_coded_bank(
        folder / "bank", TEXTS, quantizer, quantizer.codes(MEMBERS), name="fixture-coded",
        rescore=RESCORE,
    )  # fmt: skip
    argv = ["add-editor", str(bank), str(POINTER), "--k", str(K), "--max-prefix", "16"]
    argv += ["--encoder-precision", "float32", "--decoder", "rp=1.5,rpn=2,eos=-3,max=24"]
    assert main(argv) == 0
    return bank


@pytest.fixture(scope="module")
def served(bank: Path) -> Iterator[RunningServer]:
    server = start_server(bank.parent, ["--model", f"{CODED}={bank}", "--max-batch-size", "16"])
    yield server
    assert server.stop(signal.SIGTERM) == 0, server.log()


@pytest.fixture(scope="module")
def offline_bank(bank: Path) -> LoadedPhraseBank:
    """The bank as the server holds it: its editor's (float32) encoder re-embeds."""
    return load_phrase_bank(bank, encode=SentenceEncoder.load(precision="float32").encode)


def test_generate_gives_the_coded_searchs_exact_cosines(
    served: RunningServer, offline_bank: LoadedPhraseBank
) -> None:
    scores, rows = offline_bank.bank.search(torch.from_numpy(ASKED), 5)
    with Client(served.address, timeout=120) as client:
        for asked, want_scores, want_rows in zip(ASKED, scores, rows, strict=True):
            found = client.generate(asked, model=CODED, top_k=5).candidates
            assert [c.index for c in found] == want_rows.tolist()
            got = np.array([c.score for c in found])
            np.testing.assert_allclose(got, want_scores.numpy(), atol=1e-4)
            exact = MEMBERS[want_rows.numpy()] @ (asked / np.linalg.norm(asked))
            np.testing.assert_allclose(got, exact, atol=2e-3)  # the stored embeddings' cosine
        info = client.model_info(CODED)
    assert info.card["dtype"] == "opq" and info.card["rescore"] == RESCORE


def test_decode_answers_what_the_editor_picks_from_the_coded_search(
    served: RunningServer, bank: Path, offline_bank: LoadedPhraseBank
) -> None:
    editor = load_editor(bank, offline_bank.card, torch.device("cpu"))
    assert editor is not None
    scores, rows = offline_bank.bank.search(torch.from_numpy(ASKED), K)
    neighbours = [[TEXTS[i] for i in row] for row in rows.tolist()]
    offline = editor.answers(ASKED, neighbours, scores.numpy())
    with served.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        request = pb.DecodeBatchRequest(model=CODED, embeddings=[as_pb(e) for e in ASKED])
        results = [r.response for r in stub.DecodeBatch(request, timeout=180).results]
    assert [r.text for r in results] == [text for text, *_ in offline]
    for response, (_, score, _, _) in zip(results, offline, strict=True):
        assert response.similarity == pytest.approx(score, abs=1e-3)
