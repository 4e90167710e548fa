"""Runs in a subprocess: calls every RPC of a running retd with a STOCK stub generated from
decoder.proto (top-level `decoder_pb2`), never importing the retd package, and prints JSON.

argv: ADDRESS, then a JSON file with "embeddings" (lists of 768 floats)."""

import json
import struct
import sys

import decoder_pb2 as pb
import decoder_pb2_grpc as pb_grpc
import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc


def as_dict(message):
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def error(exc):
    return {"code": exc.code().name, "details": exc.details()}


def vector(values):
    return pb.Embedding(vector=pb.FloatVector(values=values))


def raw(values, shape):
    data = struct.pack(f"<{len(values)}f", *values)
    return pb.Embedding(raw=pb.RawTensor(data=data, shape=shape))


def main():
    address, inputs_path = sys.argv[1], sys.argv[2]
    with open(inputs_path) as f:
        embeddings = json.load(f)["embeddings"]
    e0, e1, e2 = (vector(v) for v in embeddings[:3])
    bad = vector([0.5] * 5)
    out = {}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.DecoderStub(channel)
        decode = lambda e, n=16: stub.Decode(pb.DecodeRequest(embedding=e, max_new_tokens=n))  # noqa: E731
        out["decode_vector"] = as_dict(decode(e0))
        out["decode_raw"] = as_dict(decode(raw(embeddings[0], [768])))
        out["decode_raw_2d"] = as_dict(decode(raw(embeddings[0], [1, 768])))
        out["decode_raw_no_shape"] = as_dict(decode(raw(embeddings[0], [])))
        out["decodes"] = [as_dict(decode(e)) for e in (e0, e1, e2)]
        out["decode_24"] = as_dict(decode(e1, 24))

        sampled = dict(embedding=e1, max_new_tokens=24, temperature=0.9, top_k=100, top_p=0.95)
        out["generate_seeded"] = [
            as_dict(stub.Generate(pb.GenerateRequest(seed=7, **sampled))) for _ in range(2)
        ]
        out["generate_other_seed"] = as_dict(stub.Generate(pb.GenerateRequest(seed=8, **sampled)))
        out["generate_greedy"] = as_dict(
            stub.Generate(pb.GenerateRequest(embedding=e1, max_new_tokens=24, temperature=0))
        )
        unseeded = stub.Generate(pb.GenerateRequest(**sampled))
        out["generate_unseeded"] = as_dict(unseeded)
        out["generate_replayed"] = as_dict(
            stub.Generate(pb.GenerateRequest(seed=unseeded.seed, **sampled))
        )
        out["generate_stream"] = [
            as_dict(chunk) for chunk in stub.GenerateStream(pb.GenerateRequest(seed=7, **sampled))
        ]

        out["batch"] = as_dict(
            stub.DecodeBatch(pb.DecodeBatchRequest(embeddings=[e0, bad, e2], max_new_tokens=16))
        )
        out["batch_ok"] = as_dict(
            stub.DecodeBatch(pb.DecodeBatchRequest(embeddings=[e0, e1, e2], max_new_tokens=16))
        )

        items = [("a", e0), ("b", e1), ("c", bad), ("d", e2)]
        requests = (pb.DecodeStreamRequest(id=i, embedding=e, max_new_tokens=16) for i, e in items)
        out["stream"] = [as_dict(answer) for answer in stub.DecodeStream(requests)]

        models = stub.ListModels(pb.ListModelsRequest())
        out["list_models"] = as_dict(models)
        out["info_default"] = as_dict(stub.GetModelInfo(pb.GetModelInfoRequest()))
        name = models.default_model
        out["info_named"] = as_dict(stub.GetModelInfo(pb.GetModelInfoRequest(model=name)))
        try:
            stub.GetModelInfo(pb.GetModelInfoRequest(model="no-such-model"))
            out["info_unknown"] = {"code": "OK"}
        except grpc.RpcError as exc:
            out["info_unknown"] = error(exc)

        health = health_pb2_grpc.HealthStub(channel)
        out["health"] = {
            service: health_pb2.HealthCheckResponse.ServingStatus.Name(
                health.Check(health_pb2.HealthCheckRequest(service=service)).status
            )
            for service in ("", "retd.v1.Decoder", name)
        }
        try:
            health.Check(health_pb2.HealthCheckRequest(service="no-such-model"))
            out["health_unknown"] = {"code": "OK"}
        except grpc.RpcError as exc:
            out["health_unknown"] = error(exc)
    out["imported_retd"] = sorted(m for m in sys.modules if m == "retd" or m.startswith("retd."))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
