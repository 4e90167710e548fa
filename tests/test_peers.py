"""The parts of `make bench-peers` that need no TorchServe: the process-tree RSS reader, the
descriptor read from a compiled class, the handler's batch path against `generate()`, the
tables and the section of BENCHMARKS.md. (The benchmark itself needs TorchServe's own venv:
BENCHMARKS.md holds what it measured.)"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from retd.server.bench.load import process_tree, rss_mib, tree_rss_mib
from retd.server.bench.peers_report import (
    BEGIN,
    END,
    HEADING,
    PeerRun,
    ratio_table,
    servers_table,
    write_section,
)
from retd.server.bench.spawn import spawned_server


def test_tree_rss_sums_a_process_and_its_descendants() -> None:
    """A real tree: a parent that starts a child that starts a grandchild."""
    # The grandchild says when it has started (its memory no longer grows), so the sums
    # below compare settled processes.
    sleeper = "import time; print('ready', flush=True); time.sleep(60)"
    middle = (
        "import subprocess, sys, time; "
        f"c = subprocess.Popen([sys.executable, '-c', {sleeper!r}]); "
        "print(c.pid, flush=True); time.sleep(60)"
    )
    top = (
        "import subprocess, sys, time; "
        f"c = subprocess.Popen([sys.executable, '-c', {middle!r}], stdout=sys.stdout); "
        "print(c.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", top], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    try:
        # The child's and grandchild's pids (printed by their parents) and the grandchild's
        # "ready", in whichever order the processes got to them.
        lines = [parent.stdout.readline().strip() for _ in range(3)]
        assert "ready" in lines, lines
        child, grandchild = (int(line) for line in lines if line != "ready")
        assert process_tree(parent.pid) == [parent.pid, child, grandchild]
        assert process_tree(child) == [child, grandchild]
        each = [rss_mib(pid) for pid in (parent.pid, child, grandchild)]
        assert all(value is not None and value > 1 for value in each)
        total = tree_rss_mib(parent.pid)
        assert total is not None
        assert abs(total - sum(v for v in each if v is not None)) < 5  # read a moment apart
        assert tree_rss_mib(grandchild) == pytest.approx(each[2], abs=2)
    finally:
        for pid in reversed(process_tree(parent.pid)):
            subprocess.run(["kill", "-9", str(pid)], check=False)
        parent.wait()
    assert process_tree(parent.pid) == [] and tree_rss_mib(parent.pid) is None


def _modified_utf8(data: bytes) -> bytes:
    """How javac stores a protobuf descriptor string: each byte a char, NUL as C0 80."""
    return b"".join(b"\xc0\x80" if b == 0 else chr(b).encode() for b in data)


def _class_file(strings: list[bytes]) -> bytes:
    """A class file's header and constant pool: a long (two entries), a class reference and
    the strings as CONSTANT_Utf8; nothing after the pool is read."""
    pool = [b"\x05" + struct.pack(">q", 7), b"\x07" + struct.pack(">H", 4)]
    pool += [b"\x01" + struct.pack(">H", len(s)) + s for s in strings]
    count = 1 + 2 + 1 + len(strings)
    return b"\xca\xfe\xba\xbe\x00\x00\x00\x41" + struct.pack(">H", count) + b"".join(pool)


def _inference_descriptor() -> bytes:
    """The messages of TorchServe's inference.proto that the benchmark uses."""
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto(
        name="inference.proto", package="org.pytorch.serve.grpc.inference", syntax="proto3"
    )
    proto.dependency.extend(["google/protobuf/empty.proto", "google/rpc/status.proto"])
    field = descriptor_pb2.FieldDescriptorProto
    request = proto.message_type.add(name="PredictionsRequest")
    request.field.add(name="model_name", number=1, type=field.TYPE_STRING)
    request.field.add(
        name="input", number=3, type=field.TYPE_MESSAGE, label=field.LABEL_REPEATED,
        type_name=".org.pytorch.serve.grpc.inference.PredictionsRequest.InputEntry",
    )  # fmt: skip
    request.field.add(  # proto3 optional: oneof_index 0 writes a NUL byte
        name="sequence_id", number=4, type=field.TYPE_STRING, oneof_index=0,
        proto3_optional=True,
    )  # fmt: skip
    request.oneof_decl.add(name="_sequence_id")
    entry = request.nested_type.add(name="InputEntry")
    entry.field.add(name="key", number=1, type=field.TYPE_STRING)
    entry.field.add(name="value", number=2, type=field.TYPE_BYTES)
    entry.options.map_entry = True
    response = proto.message_type.add(name="PredictionResponse")
    response.field.add(name="prediction", number=1, type=field.TYPE_BYTES)
    response.field.add(
        name="status", number=3, type=field.TYPE_MESSAGE, type_name=".google.rpc.Status"
    )
    return proto.SerializeToString()


def test_the_descriptor_is_read_from_the_compiled_class(tmp_path: Path) -> None:
    from retd.server.bench.torchserve import (
        DESCRIPTOR_CLASS,
        descriptor_from_jar,
        inference_messages,
    )

    descriptor = _inference_descriptor()
    assert b"\x00" in descriptor and max(descriptor) >= 0x80  # both escapes are exercised
    jar = tmp_path / "model-server.jar"
    with zipfile.ZipFile(jar, "w") as archive:
        strings = [b"java/lang/Object", _modified_utf8(descriptor), b"descriptorData"]
        archive.writestr(DESCRIPTOR_CLASS, _class_file(strings))
    assert descriptor_from_jar(jar) == descriptor
    messages = inference_messages(jar)
    wire = messages.request(model_name="retd", input={"embedding": b"\x00\x01"})
    again = messages.request.FromString(wire.SerializeToString())
    assert again.model_name == "retd" and dict(again.input) == {"embedding": b"\x00\x01"}
    assert messages.response(prediction=b"{}").prediction == b"{}"

    empty = tmp_path / "empty.jar"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr(DESCRIPTOR_CLASS, _class_file([b"java/lang/Object"]))
    with pytest.raises(ValueError, match="no inference.proto descriptor"):
        descriptor_from_jar(empty)


def test_the_handler_answers_a_batch_as_generate_does(checkpoint: Path) -> None:
    from retd.model.checkpoint import load_checkpoint
    from retd.model.generation import SamplingParams, generate
    from retd.server.bench.torchserve_handler import RetBatchHandler

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((5, 768)).astype("<f4")
    lengths = [8, 1, 30, 12, 5]
    # as TorchServe hands them over: bytes or bytearray from gRPC, text from a text/* body
    requests = [
        {"embedding": v.tobytes() if i % 2 else bytearray(v.tobytes()),
         "max_new_tokens": str(n) if i == 4 else str(n).encode()}
        for i, (v, n) in enumerate(zip(vectors, lengths, strict=True))
    ]  # fmt: skip
    handler, threads = RetBatchHandler(), torch.get_num_threads()
    try:
        handler.load(checkpoint)  # as TorchServe's worker: one torch thread
        assert handler.initialized and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)  # the other tests' in this process
    embeddings, params = handler.preprocess(requests)
    assert embeddings.shape == (5, 768) and embeddings.dtype == torch.float32
    assert params == [SamplingParams(max_new_tokens=n) for n in lengths]
    answers = [json.loads(a) for a in handler.handle_batch(requests)]

    loaded = load_checkpoint(checkpoint)
    expected = generate(loaded.model, torch.from_numpy(vectors), params, tokenizer=loaded.tokenizer)
    assert [a["text"] for a in answers] == [r.text for r in expected]
    assert [a["generated_tokens"] for a in answers] == [len(r.token_ids) for r in expected]
    assert [a["finish_reason"] for a in answers] == [str(r.finish_reason) for r in expected]
    rows = zip(vectors, params, strict=True)
    alone = [
        generate(loaded.model, torch.from_numpy(v[None]), [p], tokenizer=loaded.tokenizer)[0]
        for v, p in rows
    ]
    assert [a["text"] for a in answers] == [r.text for r in alone]  # a batch changes nothing


@pytest.mark.skipif(importlib.util.find_spec("ts") is not None, reason="TorchServe installed")
def test_the_entry_point_says_when_torchserve_is_missing() -> None:
    from retd.server.bench import torchserve_handler

    assert torchserve_handler.TorchServeHandler is None
    with pytest.raises(RuntimeError, match="TorchServe"):
        torchserve_handler.handle(None, None)


def _run(scenario: str, server: str, round_: int, rps: float, p99: float, rss: float) -> PeerRun:
    latency = {"p50": p99 / 2, "p90": p99 * 0.9, "p99": p99}
    return PeerRun(scenario, server, round_, rps, rps * 64, latency, rss)


def test_the_tables_give_medians_and_ratios_within_each_round() -> None:
    runs = [
        _run("64 callers", "retd", 0, 100, 200, 300),
        _run("64 callers", "TorchServe", 0, 50, 400, 450),
        _run("64 callers", "TorchServe", 1, 80, 300, 460),  # round 2: the machine sped up
        _run("64 callers", "retd", 1, 120, 150, 310),
        _run("64 callers", "retd", 2, 90, 100, 320),
        _run("1 caller", "TorchServe", 0, 10, 110, 450),
        _run("1 caller", "retd", 0, 11, 100, 300),
    ]
    table = ratio_table(runs, "TorchServe").splitlines()
    assert table[0].startswith("| scenario | req/s retd / TorchServe, median |")
    # 100/50 = 2.0 and 120/80 = 1.5 (round 3 has no TorchServe run): median 1.75
    assert table[2] == "| 64 callers | **1.75** | 1.50 | 2.00 | 2.00 | 2.00 | 1.49 | 2 |"
    assert table[3] == "| 1 caller | **1.10** | 1.10 | 1.10 | 1.10 | 1.10 | 1.50 | 1 |"

    servers = servers_table(runs, {"64 callers": 200.0}).splitlines()
    assert len(servers) == 2 + 4
    assert servers[2].startswith("| 64 callers | retd | 100.0 | 6400 | 75.0 | 135.0 | 150.0 |")
    assert servers[2].endswith("| 50% | 320 | 0 |")  # median 100 of raw 200; the largest RSS
    assert servers[3].startswith("| 64 callers | TorchServe | 65.0 |")
    assert servers[4].startswith("| 1 caller | retd | 11.0 |")  # retd first in each scenario
    assert servers[4].endswith("|  | 300 | 0 |")  # no raw figure: no share


def test_the_section_is_replaced_between_its_markers(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Batching\n\ntext\n")
    write_section(path, "first table")
    text = path.read_text()
    assert text.endswith(f"text\n\n{HEADING}\n\n{BEGIN}\nfirst table\n{END}\n")
    path.write_text(text + "\n## After\n\nmore\n")
    write_section(path, "second table\n")
    again = path.read_text()
    assert again.count(BEGIN) == 1 and "first table" not in again
    assert f"{BEGIN}\nsecond table\n{END}\n\n## After\n\nmore\n" in again
    assert again.startswith("# Benchmarks\n\n## Batching\n\ntext\n")


def test_the_report_compares_each_retd_engine_with_the_peer_and_with_each_other() -> None:
    from dataclasses import asdict

    from retd.server.bench.peers import markdown

    runs = [
        _run("64 callers", "retd", 0, 100, 200, 300),
        _run("64 callers", "retd, engine process", 0, 150, 150, 480),
        _run("64 callers", "TorchServe", 0, 120, 180, 500),
    ]
    check = {"requests": 64, "retd_vs_generate": 0, "peer_vs_generate": 0, "retd_vs_peer": 0}
    results = {
        "runs": [asdict(r) for r in runs],
        "raw": {"64 callers": {"sequences_per_s": 200.0}},
        "greedy_checks": {"retd": check, "retd, engine process": {**check, "retd_vs_peer": 1}},
        "engines": ["thread", "process"],
        "settings": {"batch_size": 64, "max_batch_delay_ms": 5, "workers": 1},
        "date": "today", "commit": "abc", "torchserve": "0.12.0", "retd_args": "--x",
        "checkpoint": "ck", "rounds": 1, "duration": 1.0, "warmup": 1.0,
    }  # fmt: skip
    lines = markdown(results, "make bench-peers").splitlines()
    assert "| 64 callers | **0.83** | 0.83 | 0.83 | 0.90 | 0.90 | 1.67 | 1 |" in lines  # thread
    assert "| 64 callers | **1.25** | 1.25 | 1.25 | 1.20 | 1.20 | 1.04 | 1 |" in lines  # process
    assert "| 64 callers | **1.50** | 1.50 | 1.50 | 1.33 | 1.33 | 0.62 | 1 |" in lines  # p / t
    assert any(line.startswith("| scenario | req/s retd, engine process / retd,") for line in lines)
    assert (
        "retd, engine process: 0 answers differ from `generate()`'s, 1 from TorchServe's"
        in (lines[-1])
    )


def test_the_scenarios_count_lengths_in_the_checkpoints_tokens(checkpoint: Path) -> None:
    """A byte-level checkpoint's lengths are bytes, a BPE one's tokens; a card says which."""
    from retd.model.checkpoint import DEFAULT_CHECKPOINT
    from retd.server.bench.peers import length_unit, peer_scenarios

    root = DEFAULT_CHECKPOINT.parent
    assert length_unit(checkpoint) == "bytes"  # the tests' untrained one: tokenizer "bytes"
    assert length_unit(root / "ret_v21") == "bytes"  # a card from before tokenizers
    assert length_unit(DEFAULT_CHECKPOINT) == "tokens"  # the shipped BPE one
    names = [s.name for s in peer_scenarios(1.0, 0.0, length_unit(DEFAULT_CHECKPOINT))]
    assert names == [
        "64 callers, 64 tokens",
        "64 callers, 8..128 tokens",
        "1 caller, 64 tokens",
        "1 caller, 8..128 tokens",
    ]


def test_a_spawned_server_gets_the_environment_asked_and_this_process_keeps_its_own(
    checkpoint: Path,
) -> None:
    """The peer benchmark runs retd on one OpenMP thread, as TorchServe's worker, without
    setting it in its own process (where the raw model and the load generator run)."""
    before = dict(os.environ)
    mark = {"RETD_SPAWN_MARK": "peers", "OMP_NUM_THREADS": "1"}
    with spawned_server(checkpoint, "--metrics-port 0", mark) as (address, pid):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
    assert b"RETD_SPAWN_MARK=peers" in environ and b"OMP_NUM_THREADS=1" in environ
    assert dict(os.environ) == before
