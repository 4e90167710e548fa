"""OutputBuffer and the byte tokenizer: stop strings, streaming deltas, never-raising decode."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retd.model.generation import FinishReason, OutputBuffer, SamplingParams
from retd.model.tokenizer import EOS_ID, VOCAB_SIZE, decode, encode

ALPHABET = "aAE\n é€😀"  # 1-, 2-, 3- and 4-byte characters


def feed(buffer: OutputBuffer, data: bytes | list[int], deltas: list[str] | None = None) -> None:
    for token in data:
        buffer.append(token, -0.5)
        if deltas is not None:
            deltas.append(buffer.take_delta())
        if buffer.finished:
            return


def expected_text(stream: list[int], stops: list[str]) -> str:
    """The oracle: bytes before EOS, cut at the earliest stop match, decoded with replacement."""
    data = bytes(stream[: stream.index(0)] if 0 in stream else stream)
    cuts = [data.find(s.encode()) for s in stops if s.encode() in data]
    return data[: min(cuts, default=len(data))].decode("utf-8", errors="replace")


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[int], list[str]]:
    """Random byte streams mixing valid text, invalid bytes, stop strings and maybe an EOS."""
    stops = draw(st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3))
    pieces = st.one_of(
        st.text(ALPHABET, max_size=5).map(encode),
        st.binary(max_size=4).map(lambda b: list(b.replace(b"\0", b"\x80"))),
        st.sampled_from(stops or ["x"]).map(encode),
        st.just([EOS_ID]),
        st.text(ALPHABET, min_size=1, max_size=2).map(lambda t: encode(t)[:-1]),  # cut char
    )
    stream = [b for piece in draw(st.lists(pieces, max_size=12)) for b in piece]
    return stream, stops


@given(streams(), st.integers(1, 80))
def test_deltas_rejoin_to_the_final_text(case: tuple[list[int], list[str]], limit: int) -> None:
    stream, stops = case
    buffer = OutputBuffer(SamplingParams(max_new_tokens=limit, stop=tuple(stops)))
    deltas: list[str] = []
    feed(buffer, stream, deltas)
    streamed_before_finish = "".join(deltas)
    if not buffer.finished:
        assert expected_text(stream, stops).startswith(streamed_before_finish)
        return
    deltas.append(buffer.take_delta())
    assert buffer.take_delta() == ""
    n = len(buffer.token_ids)
    assert buffer.token_ids == stream[:n]
    assert "".join(deltas) == buffer.text() == expected_text(stream[:n], stops)


@given(st.text(ALPHABET, max_size=30), st.lists(st.text(ALPHABET, min_size=1, max_size=3)))
def test_valid_utf8_never_streams_a_split_character(text: str, stops: list[str]) -> None:
    buffer = OutputBuffer(SamplingParams(max_new_tokens=200, stop=tuple(stops)))
    deltas: list[str] = []
    feed(buffer, encode(text), deltas)
    assert all("\ufffd" not in d for d in deltas)
    if not buffer.finished:
        assert text.startswith("".join(deltas))


@given(streams())
def test_finish_reason_matches_the_stream(case: tuple[list[int], list[str]]) -> None:
    stream, stops = case
    stream = [*stream, 65]
    buffer = OutputBuffer(SamplingParams(max_new_tokens=len(stream), stop=tuple(stops)))
    feed(buffer, stream)
    data = bytes(buffer.token_ids)
    if buffer.finish_reason is FinishReason.EOS:
        assert buffer.token_ids[-1] == EOS_ID and EOS_ID not in buffer.token_ids[:-1]
    elif buffer.finish_reason is FinishReason.STOP:
        assert any(data.endswith(s.encode()) for s in stops)
    else:
        assert buffer.finish_reason is FinishReason.LENGTH and data == bytes(stream)
    assert not any(s.encode() in data[:-1] for s in stops)  # it stopped at the first match


def test_partial_stop_is_held_back_until_it_cannot_match() -> None:
    buffer = OutputBuffer(SamplingParams(max_new_tokens=100, stop=("END",)))
    feed(buffer, b"abcEN")
    assert buffer.take_delta() == "abc"
    feed(buffer, b"X")
    assert buffer.take_delta() == "ENX"
    feed(buffer, b"yEND")
    assert buffer.finish_reason is FinishReason.STOP
    assert buffer.take_delta() == "y"
    assert buffer.text() == "abcENXy"
    assert buffer.token_ids == list(b"abcENXyEND")


def test_multibyte_characters_are_streamed_whole() -> None:
    buffer = OutputBuffer(SamplingParams(max_new_tokens=100))
    euro = "€".encode()
    feed(buffer, euro[:2])
    assert buffer.take_delta() == ""
    feed(buffer, euro[2:])
    assert buffer.take_delta() == "€"


def test_eos_and_length() -> None:
    buffer = OutputBuffer(SamplingParams(max_new_tokens=100))
    assert buffer.append(104, -1.0) is None
    assert buffer.append(105, -2.0) is None
    assert buffer.append(EOS_ID, -3.0) is FinishReason.EOS
    assert buffer.finished and buffer.text() == "hi" and buffer.token_ids == [104, 105, 0]
    assert buffer.mean_logprob == pytest.approx(-2.0)
    with pytest.raises(RuntimeError):
        buffer.append(65, 0.0)
    short = OutputBuffer(SamplingParams(max_new_tokens=2))
    assert short.mean_logprob == 0.0
    assert short.append(65, 0.0) is None
    assert short.append(66, 0.0) is FinishReason.LENGTH
    assert short.take_delta() == "AB"


def test_stop_beats_length_on_the_same_token_and_earliest_match_wins() -> None:
    buffer = OutputBuffer(SamplingParams(max_new_tokens=3, stop=("c", "abc")))
    feed(buffer, b"abc")
    assert buffer.finish_reason is FinishReason.STOP
    assert buffer.text() == ""


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_constants() -> None:
    assert (EOS_ID, VOCAB_SIZE) == (0, 256)


@given(st.text())
def test_encode_decode_round_trip(text: str) -> None:
    ids = encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert decode(ids) == text


@given(st.lists(st.integers()))
def test_decode_never_raises(ids: list[int]) -> None:
    text = decode(ids)
    assert isinstance(text, str)
    if all(0 <= i < 256 for i in ids):
        assert text == bytes(ids).decode("utf-8", errors="replace")


def test_decode_replaces_out_of_range_ids() -> None:
    assert decode([104, 300, 105, -1]) == "h\ufffdi\ufffd"
    assert decode([0xE2, 0x82]) == "\ufffd"
    assert decode(iter([72, 105])) == "Hi"
