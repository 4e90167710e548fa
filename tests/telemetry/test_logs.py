"""Logs of a subprocess daemon: with `--access-log on`, one access line per call on
`retd.access`, as JSON objects (`--log-format json`) or text, carrying the trace id of the
call's exported span; none by default; text lines name trace ids only when there are some."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import grpc
import pytest

from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, start_server
from tests.telemetry.conftest import SERVICE, Receiver, embedding

HEX32 = re.compile(r"[0-9a-f]{32}")
HEX16 = re.compile(r"[0-9a-f]{16}")


def some_calls(server: RunningServer) -> list[tuple[str, str, int]]:
    """Calls of every shape; returns (method, status, tokens generated) per call, in order."""
    calls = []
    with server.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        decode = stub.Decode(pb.DecodeRequest(embedding=embedding(1), max_new_tokens=7))
        calls.append(("Decode", "OK", decode.usage.generated_tokens))
        with pytest.raises(grpc.RpcError):
            stub.Decode(pb.DecodeRequest(embedding=embedding(2, dim=4)))
        calls.append(("Decode", "INVALID_ARGUMENT", 0))
        batch = stub.DecodeBatch(
            pb.DecodeBatchRequest(embeddings=[embedding(3), embedding(4)], max_new_tokens=5)
        )
        calls.append(
            ("DecodeBatch", "OK", sum(r.response.usage.generated_tokens for r in batch.results))
        )
        requests = [
            pb.DecodeStreamRequest(id=str(i), embedding=embedding(5 + i), max_new_tokens=3 + i)
            for i in range(3)
        ]
        answers = list(stub.DecodeStream(iter(requests)))
        calls.append(
            ("DecodeStream", "OK", sum(a.response.usage.generated_tokens for a in answers))
        )
        with pytest.raises(grpc.RpcError):
            stub.GetModelInfo(pb.GetModelInfoRequest(model="nope"))
        calls.append(("GetModelInfo", "NOT_FOUND", 0))
    return calls


def json_lines(server: RunningServer) -> list[dict[str, Any]]:
    lines = [line for line in server.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(entry, dict) for entry in entries)
    return entries


def access_lines(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry["logger"] == "retd.access"]


def assert_access_lines_match(access: list[dict[str, Any]], calls: list[tuple[str, str, int]]):
    assert [(a["rpc_method"], a["status"], a["tokens"]) for a in access] == calls
    for entry in access:
        assert entry["level"] == "INFO"
        assert isinstance(entry["latency_ms"], float | int) and entry["latency_ms"] >= 0
        assert entry["message"].startswith(f"{entry['rpc_method']} {entry['status']} ")
        assert entry["model"] == ("ret_v21" if entry["tokens"] else "")


def test_json_access_lines_carry_the_trace_of_the_exported_span(
    tmp_path: Path, checkpoint: Path, receiver: Receiver
) -> None:
    server = start_server(
        tmp_path,
        ["--checkpoint", str(checkpoint), "--log-format", "json", "--traces-exporter", "otlp",
         "--otlp-endpoint", receiver.endpoint, "--access-log", "on"],
    )  # fmt: skip
    try:
        calls = some_calls(server)
    finally:
        assert server.stop() == 0, server.log()
    access = access_lines(json_lines(server))
    assert_access_lines_match(access, calls)

    rpc_spans = {
        (span.trace_id, span.proto.span_id.hex()): span
        for span in receiver.servicer.spans()
        if not span.name.endswith(" item")
    }
    assert len(rpc_spans) == len(calls)
    for entry in access:
        assert HEX32.fullmatch(entry["trace_id"]) and HEX16.fullmatch(entry["span_id"])
        span = rpc_spans[(entry["trace_id"], entry["span_id"])]
        assert span.name == f"{SERVICE}/{entry['rpc_method']}"
    assert len({entry["trace_id"] for entry in access}) == len(calls)  # a trace per call


def test_json_logs_without_tracing_have_empty_trace_ids(tmp_path: Path, checkpoint: Path) -> None:
    server = start_server(
        tmp_path,
        ["--checkpoint", str(checkpoint), "--log-format", "json"],
        env={"RETD_ACCESS_LOG": "on"},
    )
    try:
        calls = some_calls(server)
    finally:
        assert server.stop() == 0, server.log()
    entries = json_lines(server)
    assert_access_lines_match(access_lines(entries), calls)
    for entry in entries:
        assert (entry["trace_id"], entry["span_id"]) == ("", "")
        assert {"time", "level", "logger", "message"} <= set(entry)
    assert any("retd serving" in entry["message"] for entry in entries)


def test_text_access_line_names_the_method_and_status(tmp_path: Path, checkpoint: Path) -> None:
    server = start_server(tmp_path, ["--checkpoint", str(checkpoint), "--access-log", "on"])
    try:
        calls = some_calls(server)
    finally:
        assert server.stop() == 0, server.log()
    assert "trace_id=" not in server.log()  # tracing off: no empty `trace_id= span_id=`
    access = [line for line in server.log().splitlines() if " retd.access: " in line]
    assert len(access) == len(calls)
    for line, (method, status, tokens) in zip(access, calls, strict=True):
        assert " INFO retd.access: " in line
        message = line.split(" retd.access: ", 1)[1]
        assert re.match(rf"{method} {status} \d+\.\dms {tokens} tokens", message), line
        assert line.endswith(f" tokens {'ret_v21' if tokens else ''}".rstrip())


def test_no_access_lines_by_default(tmp_path: Path, checkpoint: Path) -> None:
    server = start_server(tmp_path, ["--checkpoint", str(checkpoint), "--log-format", "json"])
    try:
        some_calls(server)
    finally:
        assert server.stop() == 0, server.log()
    entries = json_lines(server)
    assert access_lines(entries) == []
    assert any("retd serving" in entry["message"] for entry in entries)  # other INFO lines stay


def test_text_lines_name_the_trace_when_there_is_one(
    tmp_path: Path, checkpoint: Path, receiver: Receiver
) -> None:
    server = start_server(
        tmp_path,
        ["--checkpoint", str(checkpoint), "--traces-exporter", "otlp", "--otlp-endpoint",
         receiver.endpoint, "--access-log", "on"],
    )  # fmt: skip
    try:
        calls = some_calls(server)
    finally:
        assert server.stop() == 0, server.log()
    access = [line for line in server.log().splitlines() if " retd.access: " in line]
    assert len(access) == len(calls)
    suffix = re.compile(r" trace_id=[0-9a-f]{32} span_id=[0-9a-f]{16}$")
    assert all(suffix.search(line) for line in access), access
    serving = next(line for line in server.log().splitlines() if "retd serving" in line)
    assert "trace_id=" not in serving  # logged outside any call: no trace to name
