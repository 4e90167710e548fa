"""Client against the real retd daemon (the session's `server`): models, model info and
health, typed errors, and channels (unreachable servers, passed channels, metadata,
requests built without a server)."""

from __future__ import annotations

import hashlib
import re

import grpc
import numpy as np
import pytest

from retd.client import (
    Client,
    DeadlineExceededError,
    HealthStatus,
    InvalidArgumentError,
    ModelInfo,
    ModelLoad,
    NotFoundError,
    UnavailableError,
    _health,
)
from retd.v1 import decoder_pb2
from tests._wait import poll
from tests.client.conftest import DIM, MODEL, embeddings

E = embeddings(4, seed=9)  # greedy texts "000…", "\ufffd…", "444…", "]]]…": distinct
N = 16  # max_new_tokens of most calls: enough to tell texts apart, fast on a CPU


# --- models, info, health -------------------------------------------------------------------


def test_list_models_and_default_model(client):
    [info] = client.list_models()
    assert isinstance(info, ModelInfo) and info.name == MODEL
    assert client.default_model() == MODEL


def test_model_info(client, checkpoint):
    info = client.model_info()
    assert info.name == MODEL and info.architecture == "ret_v21"
    assert info.parameter_count == 722944
    assert info.embedding_dim == DIM
    assert (info.vocab_size, info.max_length) == (256, 256)
    assert info.trained is False and info.version == "2.1.0-untrained"
    assert (info.dtype, info.device) == ("float32", "cpu")
    assert info.encoder == info.card["encoder"]["name"]
    assert info.card["trained"] is False
    hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in checkpoint.iterdir()}
    assert info.checkpoint_sha256 in hashes
    assert isinstance(info.load, ModelLoad)
    named = client.model_info(MODEL)
    assert (named.name, named.checkpoint_sha256) == (info.name, info.checkpoint_sha256)
    with pytest.raises(NotFoundError, match="model: 'nope' is not loaded"):
        client.model_info("nope")


def test_model_load_shows_the_server_defaults(client):
    load = poll(lambda: (x := client.model_info().load).running == 0 and x, what="idle model")
    assert load == ModelLoad(
        waiting=0,
        max_queue_size=1024,
        running=0,
        max_batch_size=32,
        batching="continuous",
        max_wait_ms=0.0,
    )
    [listed] = client.list_models()
    assert (listed.load.max_batch_size, listed.load.max_queue_size) == (32, 1024)


def test_health(client):
    assert client.health() is HealthStatus.SERVING
    assert client.health("retd.v1.Decoder") == "SERVING"
    assert client.health(MODEL) is HealthStatus.SERVING
    with pytest.raises(NotFoundError):
        client.health("nope")


def test_health_messages_match_grpc_health():
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    ours = _health.HealthCheckRequest(service="retd.v1.Decoder").SerializeToString()
    assert health_pb2.HealthCheckRequest.FromString(ours).service == "retd.v1.Decoder"
    for status in range(4):
        wire = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        parsed = _health.HealthCheckResponse.FromString(wire)
        assert _health.health_status(parsed) == health_pb2.HealthCheckResponse.ServingStatus.Name(
            status
        )


# --- typed errors ---------------------------------------------------------------------------


def test_wrong_dimension_is_invalid_argument_naming_the_field(client, server):
    with pytest.raises(InvalidArgumentError) as info:
        client.decode(E[0][:3])
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith("embedding: got 3 values; expected 768")
    vector_error = r"^INVALID_ARGUMENT: embedding: got 5 values"  # whatever the encoding
    with (
        Client(server.address, timeout=30, encoding="vector") as vector,
        pytest.raises(InvalidArgumentError, match=vector_error),
    ):
        vector.generate(np.ones(5))
    with pytest.raises(InvalidArgumentError, match=re.escape("embedding: value 2 is nan")):
        client.decode(np.where(np.arange(DIM) == 2, np.nan, 1.0))


def test_tensors_of_every_float_dtype_decode_as_their_float32_values(client):
    """A bfloat16 / float16 / float64 torch tensor (CPU, requiring grad or not) decodes like
    the float32 array of its values; a plain list of the wrong length gets an error naming
    `embedding`, the argument, not `embedding.raw`, the encoding the client chose."""
    import torch

    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        tensor = torch.tensor(E[1], dtype=dtype, requires_grad=dtype is torch.float64)
        expected = client.decode(tensor.detach().float().numpy(), max_new_tokens=N).text
        assert client.decode(tensor, max_new_tokens=N).text == expected, dtype
        (item,) = client.decode_batch(tensor.reshape(1, -1), max_new_tokens=N)
        assert item.unwrap().text == expected
    with pytest.raises(InvalidArgumentError) as info:
        client.decode([0.5, 1.5])
    assert info.value.details.startswith("embedding: got 2 values; expected 768 float32 values")


def test_bad_parameters_are_invalid_argument_naming_the_field(client):
    cases = [
        (dict(max_new_tokens=1000), "max_new_tokens: 1000 exceeds"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(stop=["ok", ""]), r"stop\[1\]: empty"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InvalidArgumentError, match=match):
            client.generate(E[0], **kwargs)
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        client.decode(E[0], max_new_tokens=-1)  # refused client-side


def test_unknown_model_is_not_found(client):
    with pytest.raises(NotFoundError, match="model: 'nope' is not loaded") as info:
        client.decode(E[0], model="nope")
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFoundError):
        client.generate(E[0], model="nope")
    with pytest.raises(NotFoundError):
        list(client.generate_stream(E[0], model="nope"))


def test_tiny_timeout_is_deadline_exceeded(client):
    with pytest.raises(DeadlineExceededError) as info:
        client.decode(E[0], max_new_tokens=256, eos_bias=-20, timeout=1e-6)  # 256 bytes
    assert isinstance(info.value, TimeoutError)
    # a sampled call that may end in a few bytes can beat the client's timer (it did, once
    # the engine got faster): a seed whose sample runs long (the same seed, the same bytes)
    seed = next(
        s
        for s in range(50)
        if len(client.generate(E[0], max_new_tokens=256, seed=s).token_ids) >= 128
    )
    with pytest.raises(DeadlineExceededError):
        client.generate(E[0], max_new_tokens=256, seed=seed, timeout=1e-6)
    with pytest.raises(DeadlineExceededError):
        list(client.generate_stream(E[0], max_new_tokens=256, seed=seed, timeout=1e-6))
    hasty = Client(client.target, timeout=1e-6)  # the client's default deadline applies
    with hasty, pytest.raises(DeadlineExceededError):
        hasty.decode(E[0], max_new_tokens=256, eos_bias=-20)
    poll(lambda: client.model_info().load.running == 0, what="expired sequences dropped")


# --- channels -------------------------------------------------------------------------------


def test_unreachable_server():
    with Client("127.0.0.1:1", timeout=5) as c:
        with pytest.raises(UnavailableError):
            c.decode(E[0])
        with pytest.raises(UnavailableError):
            c.wait_ready(timeout=0.2)


def test_wait_ready_and_passed_channel_stays_open(server):
    channel = server.channel()
    with Client(channel=channel) as c:
        c.wait_ready(timeout=10)
        text = c.decode(E[0], max_new_tokens=N).text
    with Client(channel=channel) as c:  # still usable
        assert c.decode(E[0], max_new_tokens=N).text == text
    channel.close()


def test_metadata_is_sent_and_harmless(server):
    with Client(server.address, timeout=30, metadata=[("x-retd-test", "1")]) as c:
        assert c.health() is HealthStatus.SERVING
        assert c.decode(E[0], max_new_tokens=4).usage.generated_tokens == 4


def test_request_builders_do_not_need_a_server():
    from retd.client import _requests

    req = _requests.generate(
        E[0],
        model="m",
        max_new_tokens=np.int64(4),
        temperature=None,
        top_k=None,
        top_p=0.9,
        seed=2**64 - 1,
        stop=("a", "b"),
        encoding="raw",
        priority=np.int32(-7),
    )
    assert isinstance(req, decoder_pb2.GenerateRequest)
    assert req.max_new_tokens == 4 and req.seed == 2**64 - 1 and list(req.stop) == ["a", "b"]
    assert abs(req.top_p - 0.9) < 1e-6 and req.priority == -7
    assert not req.HasField("temperature") and req.HasField("seed")
    for build in (_requests.decode, _requests.decode_batch):
        arg = E[0] if build is _requests.decode else E
        assert build(arg, model=None, max_new_tokens=None, encoding="raw").priority == 0
        assert build(arg, model=None, max_new_tokens=None, encoding="raw", priority=2).priority == 2
    assert (
        _requests.stream_item(
            0, E[0], model=None, max_new_tokens=None, encoding="raw", priority=4
        ).priority
        == 4
    )
    with pytest.raises(InvalidArgumentError, match="seed"):
        _requests.generate(
            E[0],
            model=None,
            max_new_tokens=None,
            temperature=None,
            top_k=None,
            top_p=None,
            seed=-1,
            stop=None,
            encoding="raw",
        )
