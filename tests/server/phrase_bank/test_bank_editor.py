"""A phrase bank with an editor (`retd add-editor`), served by the real daemon with the real
encoder: Decode answers by retrieve, edit, verify, exactly as the editor does offline on the
same neighbours; Generate and a hybrid Decode's first look stay the plain search."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from retd.client import AnswerSource, Client, Hybrid
from retd.model.bank_editor import load_editor
from retd.model.checkpoint import init_checkpoint
from retd.model.embed import load_split
from retd.model.phrase_bank import load_phrase_bank, save_phrase_bank
from retd.model.retrieve_edit import agreement, pick
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, start_server
from tests.server.phrase_bank.conftest import FIXTURE, MEMBERS, TEXTS, as_pb, status_of

POINTER = Path(__file__).parents[3] / "model/checkpoints/ret_v21_bpe1792_pointer"
EDITED, RET = "edited", "ret"
K = 3
HELD = load_split(FIXTURE, "heldout")
ASKED = HELD.embeddings[:8].astype(np.float32)  # texts the bank does not hold


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from retd.client.cli import main

    folder = tmp_path_factory.mktemp("edited_bank")
    bank = save_phrase_bank(folder / "bank", TEXTS, MEMBERS, name="fixture-edited")
    # float32: the server and the offline answers below re-encode alike without compiling
    # the bfloat16 path ("auto", the default, would on a CPU with bfloat16 instructions)
    argv = ["add-editor", str(bank), str(POINTER), "--k", str(K), "--max-prefix", "16"]
    argv += ["--encoder-precision", "float32"]
    assert main([*argv, "--decoder", "rp=1.5,rpn=2,eos=-3,max=24"]) == 0
    return bank


@pytest.fixture(scope="module")
def served(bank: Path) -> Iterator[RunningServer]:
    ret = init_checkpoint(bank.parent / "ret", seed=3)
    args = ["--model", f"{EDITED}={bank}", "--model", f"{RET}={ret}", "--max-batch-size", "16"]
    server = start_server(bank.parent, args)
    yield server
    assert server.stop(signal.SIGTERM) == 0, server.log()


@pytest.fixture(scope="module")
def stub(served: RunningServer) -> Iterator[pb_grpc.DecoderStub]:
    with served.channel() as channel:
        yield pb_grpc.DecoderStub(channel)


@pytest.fixture(scope="module")
def offline(bank: Path) -> list[tuple[str, float, int, bool]]:
    """The editor's answers for ASKED, computed here from the bank as the server holds it."""
    loaded = load_phrase_bank(bank)
    editor = load_editor(bank, loaded.card, torch.device("cpu"))
    assert editor is not None
    scores, rows = loaded.bank.search(torch.from_numpy(ASKED), K)
    neighbours = [[TEXTS[i] for i in row] for row in rows.tolist()]
    return editor.answers(ASKED, neighbours, scores.numpy())


def test_decode_answers_what_the_editor_picks_offline(
    stub: pb_grpc.DecoderStub, offline: list[tuple[str, float, int, bool]]
) -> None:
    request = pb.DecodeBatchRequest(model=EDITED, embeddings=[as_pb(e) for e in ASKED])
    results = [r.response for r in stub.DecodeBatch(request, timeout=120).results]
    assert [r.text for r in results] == [text for text, *_ in offline]
    for response, (_, score, _, edited) in zip(results, offline, strict=True):
        assert response.similarity == pytest.approx(score, abs=1e-3)
        source = pb.ANSWER_SOURCE_EDITED if edited else pb.ANSWER_SOURCE_PHRASE_BANK
        assert response.source == source and response.model == EDITED
    assert any(edited for *_, edited in offline)  # the pointer edits some of them
    # a phrase that answers unedited is the bank's, whole
    assert all(r.text in TEXTS for r in results if r.source == pb.ANSWER_SOURCE_PHRASE_BANK)


def test_the_served_pick_is_the_editor_cards_learnt_one(bank: Path) -> None:
    # The answers above are the learnt pick's (the editor card's weights, recorded by
    # add-editor), and on these texts it is not the rule's: a server picking by the rule
    # would fail the comparison above.
    loaded = load_phrase_bank(bank)
    editor = load_editor(bank, loaded.card, torch.device("cpu"))
    assert editor is not None and editor.settings.pick_weights
    scores, rows = loaded.bank.search(torch.from_numpy(ASKED), K)
    pools = editor.pools(ASKED, [[TEXTS[i] for i in row] for row in rows.tolist()], scores.numpy())
    agreed = agreement(pools)
    settings = editor.settings
    rule = pick(pools, settings.consensus, True, settings.drop_degenerate, agreed)
    assert (settings.pick(pools, agreed) != rule).any()


def test_one_decode_through_the_client_says_an_edit_answered(
    served: RunningServer, offline: list[tuple[str, float, int, bool]]
) -> None:
    row = next(i for i, (*_, edited) in enumerate(offline) if edited)
    with Client(served.address, timeout=120) as client:
        result = client.decode(ASKED[row], model=EDITED)
    assert (result.text, result.source) == (offline[row][0], AnswerSource.EDITED)


def test_generate_and_a_hybrid_first_look_stay_the_plain_search(
    stub: pb_grpc.DecoderStub, served: RunningServer, bank: Path
) -> None:
    scores, rows = load_phrase_bank(bank).bank.search(torch.from_numpy(ASKED[:1]), K)
    plain = [TEXTS[i] for i in rows[0].tolist()]
    found = stub.Generate(
        pb.GenerateRequest(model=EDITED, embedding=as_pb(ASKED[0]), top_k=K), timeout=60
    )
    assert [c.text for c in found.candidates] == plain
    with Client(served.address, timeout=120) as client:
        first_look = client.decode(ASKED[0], model=RET, hybrid=Hybrid(EDITED, -1.0))
    assert (first_look.text, first_look.source) == (plain[0], AnswerSource.PHRASE_BANK)
    assert first_look.similarity == pytest.approx(float(scores[0, 0]), abs=1e-4)
    with Client(served.address, timeout=60) as client:
        info = client.model_info(EDITED)
    assert info.kind == "phrase_bank" and info.card["editor"]["k"] == K  # the card says so


def test_a_bad_field_is_refused_by_name_and_the_bank_keeps_answering(
    stub: pb_grpc.DecoderStub, offline: list[tuple[str, float, int, bool]]
) -> None:
    bad = pb.DecodeRequest(model=EDITED, embedding=as_pb(ASKED[0]), repetition_penalty=0.5)
    code, message = status_of(lambda: stub.Decode(bad, timeout=60))
    assert code.name == "INVALID_ARGUMENT" and "repetition_penalty" in message
    good = stub.Decode(pb.DecodeRequest(model=EDITED, embedding=as_pb(ASKED[1])), timeout=120)
    assert good.text == offline[1][0]
