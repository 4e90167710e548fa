"""A checkpoint's card may recommend its own Decode loop breakers (`decode_defaults`): the real
daemon uses them for a Decode that sets none, unless the operator set that breaker explicitly,
and `DecodeDefaults.for_card` takes only known fields within a request's bounds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from retd.model.checkpoint import load_checkpoint
from retd.model.defaults import DecodeDefaults
from retd.model.generation import SamplingParams, generate
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import start_server

EMBEDDINGS = np.random.default_rng(31).standard_normal((8, 768)).astype(np.float32)
MAX_NEW = 48
RECOMMENDED = {"repetition_penalty": 3.0, "repetition_ngram_size": 1, "no_repeat_ngram_size": 2}

values = st.one_of(
    st.integers(-5, 300), st.floats(-1, 20, allow_nan=False), st.booleans(), st.text(max_size=3)
)
names = st.sampled_from(
    ["repetition_penalty", "repetition_ngram_size", "no_repeat_ngram_size", "eos_bias",
     "temperature"]
)  # fmt: skip


@given(
    st.dictionaries(names, values),
    st.sets(st.sampled_from(["repetition_penalty", "repetition_ngram_size", "eos_bias"])),
)
def test_a_card_sets_only_known_unpinned_fields_within_bounds(
    recommended: dict[str, object], pinned: set[str]
) -> None:
    server = DecodeDefaults(no_repeat_ngram_size=0, repetition_penalty=1.5, repetition_ngram_size=4)
    got = server.for_card({"decode_defaults": recommended}, pinned)
    bounds = {"no_repeat_ngram_size": (0, 256), "repetition_penalty": (1, 10),
              "repetition_ngram_size": (1, 256), "eos_bias": (-20, 20)}  # fmt: skip
    for name, (low, high) in bounds.items():
        value = recommended.get(name)
        usable = (
            name not in pinned
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and low <= value <= high
        )
        floats = ("repetition_penalty", "eos_bias")
        expected = (int(value) if name not in floats else value) if usable else None
        assert getattr(got, name) == (getattr(server, name) if expected is None else expected)
    assert server.for_card({}) == server  # no recommendation: the server's


def breakers_texts(checkpoint: Path, defaults: DecodeDefaults) -> list[str]:
    loaded = load_checkpoint(checkpoint)
    params = SamplingParams(
        MAX_NEW,
        no_repeat_ngram_size=defaults.no_repeat_ngram_size,
        repetition_penalty=defaults.repetition_penalty,
        repetition_ngram_size=defaults.repetition_ngram_size,
    )
    results = generate(
        loaded.model, torch.from_numpy(EMBEDDINGS), [params] * len(EMBEDDINGS),
        tokenizer=loaded.tokenizer,
    )  # fmt: skip
    return [r.text for r in results]


@pytest.fixture(scope="module")
def recommending(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    """The session's checkpoint, its card recommending RECOMMENDED."""
    folder = tmp_path_factory.mktemp("recommending") / "ret_v21"
    folder.mkdir()
    for file in checkpoint.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    card = json.loads((folder / "card.json").read_text())
    (folder / "card.json").write_text(json.dumps({**card, "decode_defaults": RECOMMENDED}))
    return folder


def decode_all(server_args: list[str], tmp_path: Path, checkpoint: Path) -> list[str]:
    server = start_server(tmp_path, ["--checkpoint", str(checkpoint), *server_args],
                          plain_decode=False)  # fmt: skip
    try:
        with server.channel() as channel:
            stub = pb_grpc.DecoderStub(channel)
            return [
                stub.Decode(
                    pb.DecodeRequest(
                        embedding=pb.Embedding(
                            raw=pb.RawTensor(data=e.astype("<f4").tobytes(), shape=[768])
                        ),
                        max_new_tokens=MAX_NEW,
                    ),
                    timeout=60,
                ).text
                for e in EMBEDDINGS
            ]
    finally:
        assert server.stop() == 0, server.log()


def test_the_daemon_decodes_with_the_cards_breakers(tmp_path: Path, recommending: Path) -> None:
    carded = breakers_texts(
        recommending, DecodeDefaults().for_card({"decode_defaults": RECOMMENDED})
    )
    builtin = breakers_texts(recommending, DecodeDefaults())
    assert carded != builtin  # the recommendation changes the answers of this model
    assert decode_all([], tmp_path, recommending) == carded


def test_a_breaker_the_operator_sets_holds_over_the_cards(
    tmp_path: Path, recommending: Path
) -> None:
    args = ["--decode-repetition-penalty", "1.2"]
    pinned = DecodeDefaults(repetition_penalty=1.2).for_card(
        {"decode_defaults": RECOMMENDED}, {"repetition_penalty"}
    )
    assert pinned.repetition_penalty == 1.2 and pinned.no_repeat_ngram_size == 2
    assert decode_all(args, tmp_path, recommending) == breakers_texts(recommending, pinned)


def test_the_operators_eos_bias_is_decodes_default(tmp_path: Path) -> None:
    """`--decode-eos-bias -20` runs every Decode that sets no eos_bias to its length; one that
    sets 20 ends at once; a value out of bounds stops the daemon from starting, by name."""
    server = start_server(tmp_path, ["--decode-eos-bias", "-20"], plain_decode=False)
    try:
        with server.channel() as channel:
            stub = pb_grpc.DecoderStub(channel)
            embedding = pb.Embedding(
                raw=pb.RawTensor(data=EMBEDDINGS[0].astype("<f4").tobytes(), shape=[768])
            )
            unset = stub.Decode(pb.DecodeRequest(embedding=embedding, max_new_tokens=24))
            assert (unset.finish_reason, unset.usage.generated_tokens) == (
                pb.FINISH_REASON_LENGTH, 24
            )  # fmt: skip
            ended = stub.Decode(pb.DecodeRequest(embedding=embedding, eos_bias=20))
            assert (ended.text, ended.finish_reason) == ("", pb.FINISH_REASON_EOS)
    finally:
        assert server.stop() == 0, server.log()
    with pytest.raises(RuntimeError, match=r"decode_eos_bias: expected a number in \[-20, 20\]"):
        start_server(tmp_path, ["--decode-eos-bias", "25"])
