"""A small in-process stand-in for the retd server: the retd.v1 contract, no model, no torch.

It answers deterministically from the embedding it receives, so client tests check what went
over the wire: ``text`` is ``"<dim> <sum of the values>"``. Only embeddings of ``DIM`` values
are accepted, like the real server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
from google.protobuf import struct_pb2
from retd.v1 import decoder_pb2, decoder_pb2_grpc

DIM = 8
MODEL = "fake"


def _values(embedding: decoder_pb2.Embedding) -> np.ndarray:
    if embedding.WhichOneof("data") == "raw":
        return np.frombuffer(embedding.raw.data, dtype="<f4")
    return np.asarray(embedding.vector.values, dtype=np.float32)


def _check(embedding: decoder_pb2.Embedding, field: str) -> np.ndarray | str:
    values = _values(embedding)
    if values.size != DIM:
        return f"{field}: got {values.size} values; expected {DIM}"
    return values


def _response(values: np.ndarray, model: str) -> decoder_pb2.DecodeResponse:
    return decoder_pb2.DecodeResponse(
        text=f"{values.size} {float(values.sum()):g}",
        finish_reason=decoder_pb2.FINISH_REASON_EOS,
        usage=decoder_pb2.Usage(generated_tokens=1),
        timing=decoder_pb2.Timing(queue_ms=0.1, compute_ms=0.2, total_ms=0.3),
        model=model or MODEL,
    )


class FakeDecoder(decoder_pb2_grpc.DecoderServicer):
    def __init__(self) -> None:
        self.requests: list[object] = []
        #: Set when a GenerateStream call ends cancelled.
        self.stream_cancelled = threading.Event()

    def _model(self, request, context) -> str:
        if request.model not in ("", MODEL):
            context.abort(grpc.StatusCode.NOT_FOUND, f"model: {request.model!r} is not loaded")
        return MODEL

    def _values_or_abort(self, request, context) -> np.ndarray:
        checked = _check(request.embedding, "embedding")
        if isinstance(checked, str):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, checked)
        return checked

    def Decode(self, request, context):
        self.requests.append(request)
        model = self._model(request, context)
        return _response(self._values_or_abort(request, context), model)

    def Generate(self, request, context):
        self.requests.append(request)
        model = self._model(request, context)
        values = self._values_or_abort(request, context)
        return decoder_pb2.GenerateResponse(
            text=f"{values.size} {float(values.sum()):g}",
            token_ids=[104, 105, 0],
            finish_reason=decoder_pb2.FINISH_REASON_EOS,
            usage=decoder_pb2.Usage(generated_tokens=3),
            timing=decoder_pb2.Timing(total_ms=1.0),
            mean_logprob=-1.5,
            model=model,
            seed=request.seed if request.HasField("seed") else 42,
        )

    def GenerateStream(self, request, context):
        self.requests.append(request)
        model = self._model(request, context)
        self._values_or_abort(request, context)
        n = request.max_new_tokens or 3
        done = False
        try:
            for i in range(n):
                if not context.is_active():  # the client cancelled
                    return
                if request.stop and "slow" in request.stop:
                    time.sleep(0.05)
                yield decoder_pb2.GenerateChunk(
                    text=chr(ord("a") + i % 26), token_ids=[97 + i % 26]
                )
            yield decoder_pb2.GenerateChunk(
                finish_reason=decoder_pb2.FINISH_REASON_LENGTH,
                usage=decoder_pb2.Usage(generated_tokens=n),
                timing=decoder_pb2.Timing(total_ms=2.0),
                mean_logprob=-0.25,
                model=model,
                seed=request.seed if request.HasField("seed") else 42,
            )
            done = True
        finally:
            if not done:  # grpc closes the generator, or it returned, when the call ended early
                self.stream_cancelled.set()

    def DecodeBatch(self, request, context):
        self.requests.append(request)
        model = self._model(request, context)
        results = []
        for i, embedding in enumerate(request.embeddings):
            checked = _check(embedding, f"embeddings[{i}]")
            if isinstance(checked, str):
                error = decoder_pb2.ItemError(code=3, code_name="INVALID_ARGUMENT", message=checked)
                results.append(decoder_pb2.DecodeBatchResult(error=error))
            else:
                results.append(decoder_pb2.DecodeBatchResult(response=_response(checked, model)))
        return decoder_pb2.DecodeBatchResponse(results=results)

    def DecodeStream(self, request_iterator, context) -> Iterator[decoder_pb2.DecodeStreamResponse]:
        for request in request_iterator:
            self.requests.append(request)
            if request.model not in ("", MODEL):
                error = decoder_pb2.ItemError(code=5, code_name="NOT_FOUND", message="model")
                yield decoder_pb2.DecodeStreamResponse(id=request.id, error=error)
                continue
            checked = _check(request.embedding, "embedding")
            if isinstance(checked, str):
                error = decoder_pb2.ItemError(code=3, code_name="INVALID_ARGUMENT", message=checked)
                yield decoder_pb2.DecodeStreamResponse(id=request.id, error=error)
            else:
                yield decoder_pb2.DecodeStreamResponse(
                    id=request.id, response=_response(checked, MODEL)
                )

    def _info(self) -> decoder_pb2.ModelInfo:
        card = struct_pb2.Struct()
        card.update({"encoder": {"name": "fake-encoder", "dim": DIM}})
        return decoder_pb2.ModelInfo(
            name=MODEL,
            version="0.0.1",
            architecture="fake",
            parameter_count=1,
            embedding_dim=DIM,
            vocab_size=256,
            max_length=16,
            dtype="float32",
            device="cpu",
            checkpoint_sha256="0" * 64,
            card=card,
            trained=False,
            encoder="fake-encoder",
        )

    def ListModels(self, request, context):
        return decoder_pb2.ListModelsResponse(models=[self._info()], default_model=MODEL)

    def GetModelInfo(self, request, context):
        self._model(request, context)
        return self._info()


def _health_handler(statuses: dict[str, int]) -> grpc.GenericRpcHandler:
    """``grpc.health.v1.Health/Check`` by hand (field 1 of request and response)."""
    from retd.client import _health

    def check(request, context):
        if request.service not in statuses:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return _health.HealthCheckResponse(status=statuses[request.service])

    return grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                check,
                request_deserializer=_health.HealthCheckRequest.FromString,
                response_serializer=_health.HealthCheckResponse.SerializeToString,
            )
        },
    )


def start(statuses: dict[str, int] | None = None) -> tuple[grpc.Server, FakeDecoder, str]:
    """Start a fake server on a free port: (server, servicer, target)."""
    server = grpc.server(futures.ThreadPoolExecutor(8))
    servicer = FakeDecoder()
    decoder_pb2_grpc.add_DecoderServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers([_health_handler(statuses or {"": 1, "retd.v1.Decoder": 2})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, servicer, f"127.0.0.1:{port}"
