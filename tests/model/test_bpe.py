"""Byte-level BPE tokenizers: learning one, round trips, checkpoints that carry one, generation
and stop strings over tokens of several bytes, and training with one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retd.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from retd.model.generation import FinishReason, OutputBuffer, SamplingParams, generate
from retd.model.model import RET, config_for
from retd.model.tokenizer import BYTES, TOKENIZER_FILE, Tokenizer, train_bpe
from retd.model.train import TrainConfig, train

FIXTURE = Path(__file__).parents[1] / "data" / "embedded"
ALPHABET = "aAE\n é€😀 the"


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    texts = (FIXTURE / "corpus" / "train.txt").read_text(encoding="utf-8").splitlines()
    return train_bpe(texts, 300)


def test_a_learned_bpe_keeps_the_bytes_as_ids_0_to_255_and_adds_merges(bpe: Tokenizer) -> None:
    assert bpe.kind == "bpe" and bpe.vocab_size == 300
    assert bpe.pieces[:256] == BYTES.pieces
    merged = bpe.pieces[256:]
    assert all(len(p) >= 2 for p in merged) and len(set(merged)) == len(merged)
    texts = (FIXTURE / "corpus" / "heldout.txt").read_text(encoding="utf-8").splitlines()
    ids = bpe.encode_batch(texts)
    assert sum(map(len, ids)) < 0.8 * sum(len(t.encode()) for t in texts)  # it compresses
    assert max(max(row) for row in ids) >= 256


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=60))
def test_any_text_round_trips(bpe: Tokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text
    if text and "\x00" not in text:
        assert 0 not in ids  # byte 0 is EOS: text without it never encodes to it


@given(ids=st.lists(st.one_of(st.integers(-5, 400), st.none(), st.text(max_size=2)), max_size=20))
def test_decoding_never_raises(bpe: Tokenizer, ids: list[object]) -> None:
    text = bpe.decode(ids)  # type: ignore[arg-type]
    assert isinstance(text, str)


def test_the_json_form_round_trips_and_bad_files_are_refused(bpe: Tokenizer) -> None:
    again = Tokenizer.from_json(bpe.to_json())
    assert again.pieces == bpe.pieces and again.sha256 == bpe.sha256
    assert again.encode("the cat") == bpe.encode("the cat")
    for bad in ("", "[]", '{"model": {}}', json.dumps({"model": {"type": "WordPiece"}})):
        with pytest.raises(ValueError):
            Tokenizer.from_json(bad)
    spec = json.loads(bpe.to_json())
    spec["model"]["vocab"]["\u0100\u0100"] = 5  # a second token with id 5
    with pytest.raises(ValueError, match="once each"):
        Tokenizer.from_json(json.dumps(spec))
    with pytest.raises(ValueError, match="byte tokenizer"):
        BYTES.to_json()


def tiny(vocab_size: int, seed: int = 0) -> RET:
    model = RET(config_for("ret_tiny", {"vocab_size": vocab_size}))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.eval()


def test_a_checkpoint_carries_its_tokenizer(tmp_path: Path, bpe: Tokenizer) -> None:
    saved = save_checkpoint(
        tiny(300), tmp_path / "ck", architecture="ret_tiny", card={}, tokenizer=bpe
    )
    assert (saved / TOKENIZER_FILE).is_file()
    loaded = load_checkpoint(saved)
    assert loaded.tokenizer.pieces == bpe.pieces
    assert loaded.card["tokenizer"] == {
        "kind": "bpe", "vocab_size": 300, "file": TOKENIZER_FILE, "sha256": bpe.sha256
    }  # fmt: skip
    # a byte checkpoint has no file and says so in its card
    plain = save_checkpoint(tiny(256), tmp_path / "plain", architecture="ret_tiny", card={})
    assert not (plain / TOKENIZER_FILE).exists()
    assert load_checkpoint(plain).tokenizer is BYTES
    assert json.loads((plain / "card.json").read_text())["tokenizer"]["kind"] == "bytes"
    with pytest.raises(ValueError, match="300 tokens"):
        save_checkpoint(tiny(256), tmp_path / "x", architecture="ret_tiny", card={}, tokenizer=bpe)


def test_a_checkpoint_whose_tokenizer_is_missing_or_wrong_is_refused(
    tmp_path: Path, bpe: Tokenizer
) -> None:
    saved = save_checkpoint(
        tiny(300), tmp_path / "ck", architecture="ret_tiny", card={}, tokenizer=bpe
    )
    (saved / TOKENIZER_FILE).rename(tmp_path / "kept.json")
    with pytest.raises(CheckpointError, match="no tokenizer.json.*256 tokens.*vocab_size is 300"):
        load_checkpoint(saved)
    (saved / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read .*tokenizer.json"):
        load_checkpoint(saved)


def test_generation_turns_tokens_into_their_bytes(bpe: Tokenizer) -> None:
    model = tiny(300, seed=3)
    emb = torch.randn(6, 768, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(max_new_tokens=30, temperature=1.0, seed=i) for i in range(6)]
    results = generate(model, emb, params, tokenizer=bpe)
    assert any(t >= 256 for r in results for t in r.token_ids)  # merged tokens were drawn
    for r in results:
        body = r.token_ids[:-1] if r.finish_reason is FinishReason.EOS else r.token_ids
        assert r.text == bpe.decode(body)
    cached = generate(model, emb, params, tokenizer=bpe, use_cache=False)
    assert [r.text for r in cached] == [r.text for r in results]
    with pytest.raises(ValueError, match="300 tokens but the tokenizer 256"):
        generate(model, emb, params)


@st.composite
def token_streams(draw: st.DrawFn) -> tuple[list[bytes], list[int], list[str]]:
    """A vocabulary of bytes plus random multi-byte pieces, a token stream, stop strings."""
    merged = draw(
        st.lists(
            st.text(ALPHABET, min_size=1, max_size=4).map(str.encode).filter(lambda b: len(b) > 1),
            max_size=12,
            unique=True,
        )
    )
    pieces = [bytes([b]) for b in range(256)] + merged
    stops = draw(st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3))
    stream = draw(st.lists(st.integers(0, len(pieces) - 1), max_size=25))
    return pieces, stream, stops


@given(token_streams(), st.integers(1, 40))
def test_stops_and_deltas_over_tokens_of_several_bytes(
    case: tuple[list[bytes], list[int], list[str]], limit: int
) -> None:
    pieces, stream, stops = case
    params = SamplingParams(max_new_tokens=limit, stop=tuple(stops))
    buffer = OutputBuffer(params, 0, Tokenizer(pieces))
    deltas = []
    for token in stream:
        buffer.append(token, -1.0)
        deltas.append(buffer.take_delta())
        if buffer.finished:
            break
    deltas.append(buffer.take_delta())
    # the oracle: the first token after which the bytes hold a stop string ends the sequence
    data = b""
    for n, token in enumerate(stream, start=1):
        if token == 0:
            break
        data += pieces[token]
        if any(s.encode() in data for s in stops):
            assert buffer.finish_reason is FinishReason.STOP and len(buffer.token_ids) == n
            break
        if n == limit:
            assert buffer.finish_reason is FinishReason.LENGTH
            break
    cut = min((data.find(s.encode()) for s in stops if s.encode() in data), default=len(data))
    expected = data[:cut].decode("utf-8", errors="replace")
    if buffer.finished:
        assert "".join(deltas) == buffer.text() == expected
    else:
        assert expected.startswith("".join(deltas))


def test_training_with_a_bpe_learns_and_saves_it(tmp_path: Path, bpe: Tokenizer) -> None:
    spec = tmp_path / "tokenizer.json"
    spec.write_text(bpe.to_json())
    config = TrainConfig(
        data_dir=str(FIXTURE),
        out_dir=str(tmp_path / "run"),
        architecture="ret_tiny",
        model={"n_layer": 2},
        tokenizer=str(spec),
        batch_size=32,
        warmup_steps=5,
        max_steps=30,
        eval_every=30,
        save_every=30,
        eval_texts=16,
        threads=1,
    )
    checkpoint = train(config, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert np.mean([r["loss"] for r in lines[-5:]]) < lines[0]["loss"] - 1.0
    loaded = load_checkpoint(checkpoint)
    assert loaded.config.vocab_size == 300 and loaded.tokenizer.pieces == bpe.pieces
    # held-out loss is per byte: from ~ln(300) per token at first, and it fell
    assert lines[-1]["heldout_loss"] < np.log(300) / 1.2
    # a warm start naming no tokenizer and no shape takes the checkpoint's
    warm = dataclasses.replace(
        config,
        model={},
        tokenizer="",
        init_from=str(checkpoint),
        out_dir=str(tmp_path / "warm"),
        max_steps=2,
        eval_every=2,
    )
    went_on = load_checkpoint(train(warm, progress=False))
    assert went_on.tokenizer.pieces == bpe.pieces and went_on.config.n_layer == 2
    with pytest.raises(ValueError, match="vocab_size 256 but the tokenizer has 300"):
        train(dataclasses.replace(config, model={"vocab_size": 256}), progress=False)
    assert loaded.config.n_layer == 2


@pytest.mark.parametrize(("name", "vocab_size"), [("ret_v21_bpe", 1024), ("ret_v21_bpe1792", 1792)])
def test_a_committed_bpe_checkpoint_decodes_its_cards_examples(name: str, vocab_size: int) -> None:
    """model/checkpoints/ret_v21_bpe and ret_v21_bpe1792 (the default): 722,944 parameters
    over their own BPE, and `retd eval`'s recorded greedy outputs are what these
    weights decode from the same held-out embeddings (tests/data/heldout_head)."""
    from retd.model.checkpoint import DEFAULT_CHECKPOINT
    from retd.model.embed import load_split
    from retd.model.evaluate import greedy_texts

    loaded = load_checkpoint(DEFAULT_CHECKPOINT.parent / name)  # checks the sha256
    assert loaded.model.num_parameters() == 722_944 and loaded.trained
    assert loaded.tokenizer.kind == "bpe" and loaded.tokenizer.vocab_size == vocab_size
    examples = loaded.card["metrics"]["eval"]["examples"]
    head = load_split(Path(__file__).parents[1] / "data" / "heldout_head", "heldout")
    assert [e["reference"] for e in examples] == head.texts[: len(examples)]
    embeddings = torch.from_numpy(head.embeddings[: len(examples)].astype(np.float32))
    full = loaded.config.max_length - 1
    decoded = greedy_texts(loaded.model, embeddings, full, tokenizer=loaded.tokenizer)
    assert decoded == [e["greedy"] for e in examples]
