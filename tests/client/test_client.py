"""Client against the real retd daemon (the session's `server`): every decoding method,
streams and their cancellation, and priority. Models, info, health, typed errors and
channels: test_client_models_errors.py."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest

from retd.client import (
    Client,
    DecodeBatchItem,
    DecodeResult,
    FinishReason,
    GenerateResult,
    InvalidArgumentError,
    NotFoundError,
    StreamChunk,
    StreamItem,
)
from tests._wait import poll
from tests.client.conftest import DIM, MODEL, embeddings, stop_case

E = embeddings(4, seed=9)  # greedy texts "000…", "\ufffd…", "444…", "]]]…": distinct
N = 16  # max_new_tokens of most calls: enough to tell texts apart, fast on a CPU


def assert_sane_timing(timing) -> None:
    assert timing.queue_ms >= 0 and timing.compute_ms > 0
    assert timing.total_ms >= timing.compute_ms


# --- decode ---------------------------------------------------------------------------------


def test_decode(client):
    result = client.decode(E[0], max_new_tokens=N)
    assert isinstance(result, DecodeResult)
    assert result.model == MODEL
    assert result.finish_reason is FinishReason.LENGTH
    assert result.usage.generated_tokens == N
    assert_sane_timing(result.timing)
    assert client.decode(E[0], max_new_tokens=N).text == result.text  # greedy: deterministic
    assert client.decode(E[0], model=MODEL, max_new_tokens=N).text == result.text


def test_raw_and_vector_encodings_give_identical_text(server):
    with (
        Client(server.address, timeout=30) as raw,
        Client(server.address, timeout=30, encoding="vector") as vector,
    ):
        for e in E:
            assert raw.decode(e, max_new_tokens=N).text == vector.decode(e, max_new_tokens=N).text
            assert raw.decode(e.tolist(), max_new_tokens=N).text == (
                vector.decode(e, max_new_tokens=N).text
            )


def test_distinct_embeddings_decode_differently(client):
    texts = [client.decode(e, max_new_tokens=N).text for e in E]
    assert len(set(texts)) == len(texts)  # else the order checks below would prove nothing


def test_torch_tensor_input(client):
    torch = pytest.importorskip("torch")
    expected = client.decode(E[1], max_new_tokens=N).text
    assert client.decode(torch.from_numpy(E[1]), max_new_tokens=N).text == expected
    assert client.decode(torch.from_numpy(E[1]).reshape(1, DIM), max_new_tokens=N).text == expected
    assert client.decode(torch.from_numpy(E[1]).double(), max_new_tokens=N).text == expected


# --- generate -------------------------------------------------------------------------------


def test_generate_fields(client):
    result = client.generate(E[0], max_new_tokens=N, seed=7)
    assert isinstance(result, GenerateResult)
    assert result.seed == 7 and result.model == MODEL
    assert result.finish_reason is FinishReason.LENGTH
    assert result.usage.generated_tokens == len(result.token_ids) == N
    assert all(0 <= t < 256 for t in result.token_ids)
    assert result.text == bytes(result.token_ids).decode("utf-8", errors="replace")
    assert math.isfinite(result.mean_logprob) and result.mean_logprob < 0
    assert_sane_timing(result.timing)


def test_generate_is_reproducible_by_seed(client):
    first = client.generate(E[0], max_new_tokens=N, seed=7)
    again = client.generate(E[0], max_new_tokens=N, seed=7)
    assert (again.text, again.token_ids, again.mean_logprob) == (
        first.text,
        first.token_ids,
        first.mean_logprob,
    )
    assert client.generate(E[0], max_new_tokens=N, seed=8).token_ids != first.token_ids
    picked = client.generate(E[0], max_new_tokens=N)  # the server picks the seed, returns it
    assert client.generate(E[0], max_new_tokens=N, seed=picked.seed).token_ids == picked.token_ids


def test_temperature_zero_is_decode(client):
    for e in E[:2]:
        greedy = client.generate(e, max_new_tokens=N, temperature=0.0, seed=123)
        decoded = client.decode(e, max_new_tokens=N)
        assert greedy.text == decoded.text
        assert greedy.finish_reason is decoded.finish_reason


def test_sampling_parameters_are_applied(client):
    top1 = client.generate(E[0], max_new_tokens=N, top_k=1, seed=3)  # top-1 sampling is greedy
    assert top1.text == client.decode(E[0], max_new_tokens=N).text
    tight = client.generate(E[0], max_new_tokens=N, top_p=1e-6, seed=4)  # so is a tiny nucleus
    assert tight.text == top1.text


def test_stop_strings(client):
    base, stop, index, seed = stop_case(client, E[0], N)
    stopped = client.generate(E[0], max_new_tokens=N, seed=seed, stop=stop)
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.text == base.text[: base.text.index(stop)]
    assert stopped.token_ids == base.token_ids[: index + 1]  # the stop string's byte included
    assert stopped.usage.generated_tokens == index + 1
    listed = client.generate(E[0], max_new_tokens=N, seed=seed, stop=["\x01never", stop])
    assert (listed.text, listed.finish_reason) == (stopped.text, FinishReason.STOP)
    streamed = list(client.generate_stream(E[0], max_new_tokens=N, seed=seed, stop=stop))
    assert "".join(c.text for c in streamed) == stopped.text
    assert streamed[-1].finish_reason is FinishReason.STOP


# --- generate_stream ------------------------------------------------------------------------


def test_generate_stream_joins_to_generate(client):
    chunks = list(client.generate_stream(E[2], max_new_tokens=N, seed=11))
    whole = client.generate(E[2], max_new_tokens=N, seed=11)
    assert all(isinstance(c, StreamChunk) for c in chunks)
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert [c.is_last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    for chunk in chunks[:-1]:
        assert chunk.finish_reason is None and chunk.usage is None and chunk.seed is None
    last = chunks[-1]
    assert last.finish_reason is whole.finish_reason is FinishReason.LENGTH
    assert last.usage == whole.usage
    assert last.seed == 11 and last.model == MODEL
    assert last.mean_logprob == pytest.approx(whole.mean_logprob, abs=1e-6)
    assert last.timing is not None
    assert_sane_timing(last.timing)


def test_closing_a_stream_early_cancels_it_on_the_server(client):
    stream = client.generate_stream(E[3], max_new_tokens=256, seed=1)
    first = next(stream)
    assert not first.is_last
    stream.close()
    poll(lambda: client.model_info().load.running == 0, what="load.running == 0")


def test_stream_errors_raise_from_the_iteration(client):
    stream = client.generate_stream(E[0][:5], max_new_tokens=N)
    with pytest.raises(InvalidArgumentError, match=r"embedding: got 5 values"):
        next(stream)


# --- decode_batch ---------------------------------------------------------------------------


def test_decode_batch_keeps_request_order(client):
    expected = [client.decode(e, max_new_tokens=N).text for e in E]
    items = client.decode_batch(E, max_new_tokens=N)  # a 2-D array
    assert all(isinstance(i, DecodeBatchItem) and i.ok for i in items)
    assert [i.unwrap().text for i in items] == expected
    items = client.decode_batch(list(reversed(list(E))), max_new_tokens=N)  # a sequence
    assert [i.unwrap().text for i in items] == expected[::-1]


def test_decode_batch_bad_item_fails_alone(client):
    items = client.decode_batch([E[0], E[1][:3], E[2]], max_new_tokens=N)
    assert [i.ok for i in items] == [True, False, True]
    assert items[0].unwrap().text == client.decode(E[0], max_new_tokens=N).text
    assert items[2].unwrap().text == client.decode(E[2], max_new_tokens=N).text
    error = items[1].error
    assert isinstance(error, InvalidArgumentError)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details.startswith("embeddings[1]: got 3 values")
    with pytest.raises(InvalidArgumentError):
        items[1].unwrap()


def test_decode_batch_whole_call_errors(client):
    with pytest.raises(NotFoundError, match="model"):
        client.decode_batch(E, model="nope")
    with pytest.raises(InvalidArgumentError, match="embeddings: empty"):
        client.decode_batch([])


# --- decode_stream --------------------------------------------------------------------------


def test_decode_stream_echoes_ids_and_isolates_a_bad_item(client):
    expected = [client.decode(e, max_new_tokens=N).text for e in E]
    items = list(
        client.decode_stream([E[0], ("mine", E[1]), E[2][:7], ("last", E[3])], max_new_tokens=N)
    )
    assert all(isinstance(i, StreamItem) for i in items)
    by_id = {i.id: i for i in items}
    assert len(items) == len(by_id) == 4
    assert by_id["0"].unwrap().text == expected[0]
    assert by_id["mine"].unwrap().text == expected[1]
    assert by_id["last"].unwrap().text == expected[3]
    assert not by_id["2"].ok
    assert isinstance(by_id["2"].error, InvalidArgumentError)
    assert "got 7 values" in by_id["2"].error.details


def test_decode_stream_reads_a_generator(client):
    expected = {f"k{k}": client.decode(E[k], max_new_tokens=N).text for k in range(3)}
    read = []

    def items():
        for k in range(3):
            read.append(k)
            yield (f"k{k}", E[k])

    stream = client.decode_stream(items(), max_new_tokens=N)
    got = {i.id: i.unwrap().text for i in stream}
    assert got == expected and read == [0, 1, 2]


def test_decode_stream_unknown_model_is_per_item(client):
    [item] = list(client.decode_stream([("a", E[0])], model="nope", max_new_tokens=N))
    assert item.id == "a" and isinstance(item.error, NotFoundError)


def test_decode_stream_input_failure_is_raised(client):
    def items():
        yield E[0]
        yield np.zeros((2, DIM))  # not one embedding: rejected client-side

    with pytest.raises(InvalidArgumentError, match=r"items\[1\]"):
        list(client.decode_stream(items(), max_new_tokens=N))


# --- priority -------------------------------------------------------------------------------


def test_priority_is_accepted_by_every_method(client):
    text = client.decode(E[0], max_new_tokens=N).text
    assert client.decode(E[0], max_new_tokens=N, priority=5).text == text
    assert client.decode(E[0], max_new_tokens=N, priority=-(2**31)).text == text
    sampled = client.generate(E[0], max_new_tokens=N, seed=2)
    assert client.generate(E[0], max_new_tokens=N, seed=2, priority=2**31 - 1).text == sampled.text
    chunks = client.generate_stream(E[0], max_new_tokens=N, seed=2, priority=-1)
    assert "".join(c.text for c in chunks) == sampled.text
    items = client.decode_batch(E[:2], max_new_tokens=N, priority=3)
    assert items[0].unwrap().text == text
    [item] = list(client.decode_stream([("p", E[0])], max_new_tokens=N, priority=9))
    assert item.unwrap().text == text


@pytest.mark.parametrize("priority", [2**31, -(2**31) - 1, True, 1.5, "1"])
def test_bad_priority_is_rejected_before_any_call(client, priority):
    calls = [
        lambda: client.decode(E[0], priority=priority),
        lambda: client.generate(E[0], priority=priority),
        lambda: client.generate_stream(E[0], priority=priority),
        lambda: client.decode_batch(E, priority=priority),
        lambda: client.decode_stream(E, priority=priority),
    ]
    for call in calls:
        with pytest.raises(InvalidArgumentError, match="priority"):
            call()
