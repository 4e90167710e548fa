"""The daemon: load and warm up every model, serve Decoder + health + reflection on one
grpc.aio server, and drain gracefully on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from retd.model.kinds import (
    RET_KIND,
    checkpoint_kind,
)
from retd.server import allocator
from retd.server.admin import ADMIN_SERVICE, RepositoryService
from retd.server.calls import add_service
from retd.server.config import BATCH_ITEM_WIRE_BYTES, ModelSpec, ServerConfig
from retd.server.engine import Engine, ServingEngine
from retd.server.engine_process import EngineProcess
from retd.server.gate import CallGate
from retd.server.interceptor import CallInterceptor
from retd.server.memory import daemon_rss_bytes
from retd.server.placement import Placement, place_daemon
from retd.server.repository import ModelRegistry, ServingListener
from retd.server.security import (
    TokenAuthInterceptor,
    TokenStore,
    is_loopback,
    server_credentials,
    unusable_credentials,
)
from retd.server.service import DecoderService
from retd.server.telemetry import Telemetry
from retd.v1 import decoder_pb2 as pb
from retd.v1 import repository_pb2

log = logging.getLogger("retd.server")

DECODER_SERVICE = pb.DESCRIPTOR.services_by_name["Decoder"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def load_engine(
    spec: ModelSpec, threads: int | None = None, cpus: frozenset[int] = frozenset()
) -> ServingEngine:
    """Load a checkpoint of any kind (its card names it) onto its device and warm it up
    (runs off the event loop). `threads`: torch's CPU threads (the `torch_threads` setting,
    resolved), for the model's process; None leaves torch's own choice. `cpus`: where its
    decode worker runs (server/placement.py; empty: anywhere).

    With `engine = "process"` a RET model loads in an engine process of its own, and this
    process never imports torch for it."""
    kind = checkpoint_kind(spec.checkpoint)
    if kind == RET_KIND and spec.settings.engine == "process":
        # warm when it says it is ready
        return EngineProcess(spec, threads if threads is not None else torch_threads(0), cpus)
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    engine: Engine
    if kind == RET_KIND:
        from retd.server.ret_engine import load_ret_engine

        engine = load_ret_engine(spec)
    else:
        from retd.server.phrase_bank_engine import load_phrase_bank_engine

        engine = load_phrase_bank_engine(spec)
    engine.warm_up()
    engine.worker_cpus = cpus
    return engine


def health_listener(servicer: health.aio.HealthServicer) -> ServingListener:
    """grpc.health.v1 for each model, from the registry's reports: SERVING while a version
    of it is READY, else NOT_SERVING."""

    async def publish(name: str, serving: bool) -> None:
        await servicer.set(name, SERVING if serving else NOT_SERVING)

    return publish


class Daemon:
    """A running retd server; `stop()` drains it."""

    def __init__(
        self,
        config: ServerConfig,
        telemetry: Telemetry | None = None,
        placement: Placement | None = None,
    ) -> None:
        """`telemetry`: built from the config when None (tests pass their own providers);
        `placement`: where the models' decode workers run (`serve` pins the process to it;
        None: anywhere)."""
        self.config = config
        self.telemetry = telemetry
        self.health = health.aio.HealthServicer()
        self.models = ModelRegistry(
            config.models,
            functools.partial(
                load_engine,
                threads=torch_threads(config.torch_threads),
                cpus=(placement or Placement()).workers,
            ),
            repository=config.repository,
            model_defaults=config.model_defaults,
            default_model=config.default_model,
        )
        self.models.subscribe(health_listener(self.health))
        self.server: grpc.aio.Server | None = None
        self.service: DecoderService | None = None
        self.gate: CallGate | None = None  # the interceptor's: calls in flight, the drain
        self.token_stores: list[TokenStore] = []
        self.port = 0
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config = self.config
        if self.telemetry is None:
            self.telemetry = Telemetry.from_config(config.telemetry)
        # What can fail fast (TLS files, token files, the port) is settled before the models
        # load, so a start that fails says why without loading and releasing them first.
        credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        full_batch = config.limits.max_batch_items * BATCH_ITEM_WIRE_BYTES
        if config.message_limit < full_batch:
            log.warning(
                "max_message_bytes %d cannot hold a DecodeBatch of max_batch_items %d "
                "embeddings (%d bytes): such batches get RESOURCE_EXHAUSTED; leave "
                "max_message_bytes unset to size it from max_batch_items",
                config.message_limit,
                config.limits.max_batch_items,
                full_batch,
            )
        self.gate = gate = CallGate()
        # After the token check: a call turned away for its token gets no span.
        calls = CallInterceptor(self.telemetry, gate, (DECODER_SERVICE, ADMIN_SERVICE))
        server = grpc.aio.server(
            interceptors=[self._access_control(), calls],
            options=[
                ("grpc.max_receive_message_length", config.message_limit),
                ("grpc.max_send_message_length", config.message_limit),
                ("grpc.so_reuseport", 0),
                ("grpc.max_concurrent_streams", config.max_concurrent_streams),
                # Clients that ping more often than this get GOAWAY (ENHANCE_YOUR_CALM).
                ("grpc.http2.min_ping_interval_without_data_ms", config.keepalive_min_ping_ms),
                ("grpc.http2.max_ping_strikes", 2),
            ],
        )
        given = config.given  # the loop breakers the operator set hold over a card's
        pinned = frozenset(n.removeprefix("decode_") for n in given if n.startswith("decode_"))
        self.service = DecoderService(
            self.models, self.telemetry, config.limits, gate, config.decode_defaults, pinned
        )
        self.admin = RepositoryService(self.models)
        self.telemetry.observe(
            self.models.engines,
            lambda: gate.in_flight,
            device_memory=lambda engine: engine.device_memory(),
            rss=daemon_rss_bytes,
        )
        add_service(self.service, server, pb, "Decoder")
        add_service(self.admin, server, repository_pb2, "ModelRepository")
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if config.reflection:
            reflection.enable_server_reflection(
                (DECODER_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
                server,
            )
        if credentials is None:
            self.port = server.add_insecure_port(config.address)
            if not is_loopback(config.host):
                log.warning(
                    "serving PLAINTEXT on %s:%d, which is not a loopback address: anyone on the "
                    "network can read and send calls; use --tls-cert/--tls-key",
                    config.host,
                    self.port,
                )
        else:
            try:
                self.port = server.add_secure_port(config.address, credentials)
            except RuntimeError:
                self.port = 0
            if not self.port:
                raise unusable_credentials(
                    config.tls_cert, config.tls_key, config.tls_client_ca, config.address
                )
        calls.bound(config.host, self.port)
        try:
            await self.models.start()
        except BaseException:
            await server.stop(None)  # bound, never started: frees the port
            raise
        self.server = server
        await server.start()
        for name in ("", DECODER_SERVICE, ADMIN_SERVICE):
            await self.health.set(name, SERVING)
        await self.models.report_serving()  # every model's health
        repository = config.repository
        if repository.watch > 0:
            self._watcher = asyncio.create_task(self.models.watch(repository.watch))
        metrics_port = self.telemetry.metrics_port
        default = self.models.default_model or "none"
        if self.models.default_reason:
            default = f"{default}: {self.models.default_reason}"
        log.info(
            "retd serving %s on %s:%d (default model %s)%s%s",
            ", ".join(f"{m.name} v{m.version}" for m in self.models.ready()) or "no model",
            config.host,
            self.port,
            default,
            f"; metrics on http://{config.telemetry.metrics_host}:{metrics_port}/metrics"
            if metrics_port
            else "",
            f"; watching {repository.path} every {repository.watch:g} s" if self._watcher else "",
        )

    def _access_control(self) -> TokenAuthInterceptor:
        """Who may call what: health and reflection are open; the Decoder needs a token with
        --auth-tokens; the admin service needs an --admin-tokens token (else an
        --auth-tokens one) and, with neither, is closed on a non-loopback address."""
        config = self.config
        decoder_tokens = admin_tokens = None
        if config.auth_tokens is not None:
            decoder_tokens = admin_tokens = TokenStore(config.auth_tokens)
            self.token_stores.append(decoder_tokens)
        if config.admin_tokens is not None:
            admin_tokens = TokenStore(config.admin_tokens)
            self.token_stores.append(admin_tokens)
        closed = set()
        if admin_tokens is None and not is_loopback(config.host):
            closed.add(ADMIN_SERVICE)
            log.warning(
                "the ModelRepository admin service is closed: %s is not a loopback address "
                "and no --admin-tokens or --auth-tokens was given",
                config.host,
            )
        return TokenAuthInterceptor(
            decoder_tokens,
            {health.SERVICE_NAME, reflection.SERVICE_NAME},
            service_tokens={ADMIN_SERVICE: admin_tokens} if admin_tokens is not None else {},
            closed_services=closed,
        )

    def reload_tokens(self) -> None:
        """SIGHUP: read the token files again (no-op without --auth-tokens/--admin-tokens)."""
        for tokens in self.token_stores:
            tokens.reload()

    async def stop(self, *, quiet: bool = False) -> None:
        """Health goes NOT_SERVING, new calls get UNAVAILABLE, calls in flight get the grace
        period to finish (health and reflection keep answering meanwhile); then the last
        refusals are held until the callers are quiet, the listener closes, the held calls
        get their UNAVAILABLE, whatever is left is cancelled, and the workers stop."""
        loop = asyncio.get_running_loop()
        grace_over = loop.time() + self.config.grace_period
        await self.health.enter_graceful_shutdown()
        gate = self.gate
        if gate is not None:
            if not await gate.close(self.config.grace_period):
                log.warning("grace period over: cancelling %d calls in flight", gate.in_flight)
            elif self.server is not None:
                # Stopping grpc cancels the calls it accepted but has not handed to a handler
                # yet (CANCELLED at the client): first hold the refusals until the callers
                # are all waiting on one, so none is queued in grpc (see CallGate.quiesce).
                # Within the grace period, leaving the server its 0.5 s to stop.
                if await gate.quiesce(grace_over - loop.time() - 0.5):
                    log.info("stopping the listener (%d refused calls held)", gate.held)
                else:
                    log.warning("calls kept coming: stopping the listener under load")
        stopping = None if self.server is None else asyncio.ensure_future(self.server.stop(0.5))
        # Its first step shuts grpc core down (the GOAWAY is queued on every connection, the
        # listener closes); the held refusals are answered after it, on the same connections.
        await asyncio.sleep(0)
        if gate is not None:
            gate.release()
        if stopping is not None:
            await stopping
        if self._watcher is not None:
            self._watcher.cancel()
        await self.models.close(quiet=quiet)
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.shutdown)  # flushes spans still batched


def _write_ready_file(path: Path, host: str, port: int, metrics_port: int) -> None:
    """{address, port, pid, metrics_port} (metrics_port 0: no /metrics endpoint)."""
    temporary = path.with_name(path.name + ".tmp")
    info = {"address": f"{host}:{port}", "port": port, "pid": os.getpid()}
    temporary.write_text(json.dumps({**info, "metrics_port": metrics_port}))
    temporary.replace(path)  # readers never see a half-written file


def torch_threads(setting: int) -> int:
    """Threads for torch's CPU kernels: the setting, or one less than the cores (at most 4),
    so the event loop keeps a core for itself (with both busy, measured slower)."""
    if setting > 0:
        return setting
    return max(1, min(4, (os.cpu_count() or 1) - 1))


async def serve(config: ServerConfig) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the process exit status."""
    # A thread engine's worker hands the GIL to the event loop's thread for each call of the
    # model and waits for it back; a busy loop keeps it for up to the switch interval.
    sys.setswitchinterval(config.switch_interval_ms / 1e3)
    log.info("%s", allocator.tune())  # a step's buffers reused, not faulted in each step
    models = None if config.repository.path is not None else len(config.models)
    # Every thread of the process now; the threads and children to come inherit it.
    placement = place_daemon(config.worker_cpus, torch_threads(config.torch_threads), models)
    daemon = Daemon(config, placement=placement)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_tokens)
    try:
        await daemon.start()
    except Exception:
        await daemon.stop(quiet=True)  # nothing was served: no "released" line per model
        raise
    if config.ready_file is not None:
        metrics_port = daemon.telemetry.metrics_port if daemon.telemetry is not None else 0
        _write_ready_file(config.ready_file, config.host, daemon.port, metrics_port)
    await stop_requested.wait()
    log.info("shutting down: draining calls in flight (grace period %.1fs)", config.grace_period)
    await daemon.stop()
    log.info("stopped")
    return 0
