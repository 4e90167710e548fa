"""The models a daemon serves, version by version: loading, routing calls, hot reload.

Models come from two places: the command line (`--checkpoint`, `--model`, `[[models]]`),
each served as version 1, and a model repository, a directory `MODEL_REPO/<name>/<version>/`
(version: a positive integer) of checkpoints. Of a repository model, the newest version is
served unless an admin `Load` pins others; `poll()` (the `--watch` loop) follows the
directory: a new version is loaded and warmed up beside the old one, takes every new call
from then on, and the old one is released once the calls already on it have finished.

Calls hold a *lease* on the version that serves them for as long as they use it, so a
version is never closed under a call. A version that fails to load is recorded with its
reason; the others keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from grpc_health.v1 import health, health_pb2

from retd.model.checkpoint import RET_KIND, checkpoint_kind
from retd.server.config import (
    ConfigError,
    ModelSettings,
    ModelSpec,
    RepositoryConfig,
    model_settings_file,
)
from retd.server.engine import Engine
from retd.server.errors import ErrorKind, ServeError
from retd.server.validation import shorten

log = logging.getLogger(__name__)

# A repository model's own per-model settings, beside its version directories.
SETTINGS_FILE = "serving.toml"
NO_REPOSITORY = RepositoryConfig()
MODEL_DEFAULTS = ModelSettings()

# (file path relative to the version directory, size, mtime in ns) of every file in it.
Fingerprint = tuple[tuple[str, int, int], ...]


class State(enum.Enum):
    AVAILABLE = "available"  # in the repository, not loaded
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"  # takes no new calls; those on it finish
    FAILED = "failed"


@dataclass(eq=False)
class ModelVersion:
    """One version of one model: its checkpoint and, once loaded, its engine."""

    name: str
    version: int
    spec: ModelSpec
    state: State = State.LOADING
    reason: str = ""
    kind: str = ""
    fingerprint: Fingerprint = ()
    engine: Engine | None = None
    pinned: bool = False  # loaded by name and version: the watcher leaves it alone
    active_calls: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ready_engine(self) -> Engine:
        assert self.engine is not None, "only READY versions are leased"
        return self.engine


@dataclass(frozen=True)
class VersionStatus:
    """A row of the admin `List`."""

    name: str
    version: int
    state: State
    reason: str
    kind: str
    path: Path
    serving: bool
    active_calls: int


def scan_repository(root: Path) -> dict[str, dict[int, Path]]:
    """{model name: {version: its directory}} of a repository (hidden entries and
    directories not named by a positive integer are not versions)."""
    models: dict[str, dict[int, Path]] = {}
    try:
        model_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError as exc:
        log.error("model repository %s cannot be read: %s", root, exc)
        return models
    for model_dir in model_dirs:
        if model_dir.name.startswith("."):
            continue
        versions: dict[int, Path] = {}
        with contextlib.suppress(OSError):
            for entry in model_dir.iterdir():
                if entry.is_dir() and entry.name.isdigit() and int(entry.name) > 0:
                    versions[int(entry.name)] = entry
        models[model_dir.name] = versions
    return models


def fingerprint(directory: Path) -> Fingerprint:
    """What changes when any file of a version directory is written, added or removed."""
    rows = []
    for dirpath, _, filenames in os.walk(directory):
        for filename in filenames:
            path = Path(dirpath) / filename
            with contextlib.suppress(OSError):
                stat = path.stat()
                rows.append(
                    (path.relative_to(directory).as_posix(), stat.st_size, stat.st_mtime_ns)
                )
    return tuple(sorted(rows))


def _not_found(message: str) -> ServeError:
    return ServeError(ErrorKind.NOT_FOUND, message)


class ModelRegistry:
    """Every model version the daemon knows, and the calls' way to them (`lease`)."""

    def __init__(
        self,
        static: Sequence[ModelSpec],
        load: Callable[[ModelSpec], Engine],
        *,
        repository: RepositoryConfig = NO_REPOSITORY,
        model_defaults: ModelSettings = MODEL_DEFAULTS,
        default_model: str = "",
        health_servicer: health.aio.HealthServicer | None = None,
    ) -> None:
        """`load` builds a warm, not yet started engine (it runs in a thread).
        `repository`: the model repository, the models of it to serve (empty: all of them)
        and the drain timeout of every version; `model_defaults`: the settings repository
        models are loaded with (unless their serving.toml says otherwise)."""
        self._static = {spec.name: spec for spec in static}
        self._load_engine = load
        self.repository = repository.path
        self._repository_models = repository.models
        self._defaults = model_defaults
        self.default_model = default_model
        # Why the default model is that one, for the start-up log.
        self.default_reason = "set by --default-model" if default_model else ""
        self._drain_timeout = repository.unload_timeout
        self._health = health_servicer
        self._versions: dict[str, dict[int, ModelVersion]] = {}
        self._draining: list[ModelVersion] = []
        self._followed: set[str] = set()  # repository models whose newest version is served
        self._unloaded_by_admin: set[str] = set()  # the watcher leaves them unloaded
        self._last_seen: dict[tuple[str, int], Fingerprint] = {}
        self._lock = asyncio.Lock()
        self._drains: set[asyncio.Task[None]] = set()
        self._quiet_release = False

    # ---- start and stop ------------------------------------------------------------------

    async def start(self) -> None:
        """Load every model: a command-line model that fails stops the start (raises); a
        repository model that fails is recorded as FAILED and the others serve."""
        async with self._lock:
            for spec in self._static.values():
                entry = ModelVersion(spec.name, spec.version, spec)
                self._versions.setdefault(spec.name, {})[spec.version] = entry
                await self._load_into(entry, raise_on_failure=True)
            if self.repository is not None:
                on_disk = scan_repository(self.repository)
                wanted = self._repository_models or tuple(on_disk)
                for name in wanted:
                    self._followed.add(name)
                    versions = on_disk.get(name)
                    if not versions:
                        log.error(
                            "model %s: no version directory in %s (expected %s/<version>/)",
                            name,
                            self.repository,
                            self.repository / name,
                        )
                        continue
                    await self._load_newest_that_loads(name, versions)
        if not self.default_model:
            self.default_model, self.default_reason = self._first_model()
        elif self.default_model not in self._versions:
            log.error(
                "default model %r is not among the models %s: requests naming no model get "
                "NOT_FOUND",
                self.default_model,
                sorted(self._versions),
            )

    def _first_model(self) -> tuple[str, str]:
        """The default model when none is configured, and why it is that one: the first
        generative model by name, so that a phrase bank (say `faq` beside `ret`) is never
        the default by its name alone; else the first serving model by name."""
        generative = self.names(RET_KIND)
        if generative:
            return generative[0], "the first generative model by name"
        name = next(iter(self.names() or sorted(self._versions)), "")
        return name, "the first model by name; none is generative" if name else ""

    async def _load_newest_that_loads(self, name: str, versions: dict[int, Path]) -> None:
        """At start: the newest version, else the next newest, ... (each failure recorded),
        so that a broken new version does not leave the model without one."""
        for version in sorted(versions, reverse=True):
            entry = await self._load_version(name, version, versions[version], pinned=False)
            if entry.state is State.READY:
                return

    async def close(self, *, quiet: bool = False) -> None:
        """Release every version (after its calls finish) and wait for every drain.
        `quiet`: log the releases at DEBUG (a start that failed: nothing was served)."""
        self._quiet_release = quiet
        async with self._lock:
            for versions in self._versions.values():
                for entry in versions.values():
                    self._start_drain(entry)
            self._versions.clear()
        while self._drains:
            await asyncio.gather(*list(self._drains), return_exceptions=True)

    # ---- the calls' side -----------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, name: str, version: int = 0) -> Iterator[ModelVersion]:
        """The version serving (`name`, `version`) for as long as the block runs; raises
        ServeError (NOT_FOUND, or UNAVAILABLE while it loads) when there is none."""
        entry = self.route(name, version)
        entry.active_calls += 1
        entry.idle.clear()
        try:
            yield entry
        finally:
            entry.active_calls -= 1
            if entry.active_calls == 0:
                entry.idle.set()

    def route(self, name: str, version: int = 0) -> ModelVersion:
        name = name or self.default_model
        versions = self._versions.get(name)
        if versions is None:
            raise _not_found(
                f"model: {shorten(name)!r} is not loaded; expected one of {self.names()}"
            )
        ready = {v: e for v, e in versions.items() if e.state is State.READY}
        if version:
            if version in ready:
                return ready[version]
            raise _not_found(
                f"version: model {name!r} has no version {version} loaded; loaded versions: "
                f"{sorted(ready)} (0 means the newest)"
            )
        if ready:
            return ready[max(ready)]
        if any(e.state is State.LOADING for e in versions.values()):
            raise ServeError(ErrorKind.UNAVAILABLE, f"model {name!r} is loading; retry shortly")
        reasons = "; ".join(f"version {e.version}: {e.reason}" for e in versions.values())
        raise _not_found(f"model: {name!r} is not serving ({reasons or 'not loaded'})")

    def names(self, kind: str | None = None) -> list[str]:
        """Names of the models with a READY version (of `kind`, when given)."""
        return sorted(
            name
            for name, versions in self._versions.items()
            if any(
                e.state is State.READY and (kind is None or e.kind == kind)
                for e in versions.values()
            )
        )

    def ready(self) -> list[ModelVersion]:
        """Every READY version, by name then version."""
        return [
            entry
            for name in sorted(self._versions)
            for _, entry in sorted(self._versions[name].items())
            if entry.state is State.READY
        ]

    def serving_version(self, name: str) -> int:
        ready = [v for v, e in self._versions.get(name, {}).items() if e.state is State.READY]
        return max(ready, default=0)

    def engines(self) -> list[Engine]:
        """Every engine with work or able to take it (READY and UNLOADING versions). Safe to
        call from another thread (the metrics exporter's): it iterates snapshots, each taken
        in one step under the GIL, never a dict the event loop may be changing."""
        entries = [e for versions in list(self._versions.values()) for e in list(versions.values())]
        return [e.engine for e in [*entries, *list(self._draining)] if e.engine is not None]

    # ---- the admin side ------------------------------------------------------------------

    def status(self, name: str = "") -> list[VersionStatus]:
        """Every version known: loaded, loading, draining, failed, and (for a repository)
        on disk but not loaded."""
        rows: dict[tuple[str, int], VersionStatus] = {}
        if self.repository is not None:
            for model, versions in scan_repository(self.repository).items():
                for version, path in versions.items():
                    rows[(model, version)] = VersionStatus(
                        model, version, State.AVAILABLE, "", _kind_or_empty(path), path, False, 0
                    )
        live = [e for versions in self._versions.values() for e in versions.values()]
        for entry in [*self._draining, *live]:  # a live copy outranks a draining one
            rows[(entry.name, entry.version)] = VersionStatus(
                entry.name,
                entry.version,
                entry.state,
                entry.reason,
                entry.kind,
                entry.spec.checkpoint,
                entry.state is State.READY and entry.version == self.serving_version(entry.name),
                entry.active_calls,
            )
        return [row for key, row in sorted(rows.items()) if not name or key[0] == name]

    async def load(self, name: str, version: int = 0) -> ModelVersion:
        """Load `name` (its newest repository version, or `version`, pinned), or reload a
        command-line model from its checkpoint. Raises ServeError: NOT_FOUND when there is
        no such model or version, LOAD_FAILED when loading fails."""
        async with self._lock:
            if name in self._static:
                spec = self._static[name]
                if version not in (0, spec.version):
                    raise _not_found(
                        f"version: model {name!r} is served from {spec.checkpoint} as version "
                        f"{spec.version}; it has no version {version}"
                    )
                entry = await self._load_version(name, spec.version, spec.checkpoint, True, spec)
            else:
                versions = self._repository_versions(name)
                if version and version not in versions:
                    raise _not_found(
                        f"version: model {name!r} has no version {version} in "
                        f"{self.repository}; versions there: {sorted(versions)}"
                    )
                if not version:
                    self._followed.add(name)
                    self._unloaded_by_admin.discard(name)
                chosen = version or max(versions)
                entry = await self._load_version(name, chosen, versions[chosen], bool(version))
        if entry.state is not State.READY:
            raise ServeError(
                ErrorKind.LOAD_FAILED,
                f"model {name!r} version {entry.version} failed to load: {entry.reason}",
            )
        return entry

    async def unload(self, name: str, version: int = 0) -> list[ModelVersion]:
        """Stop routing calls to `name` (every version, or `version`), wait for the calls on
        it, release it. A repository model unloaded whole is no longer followed."""
        async with self._lock:
            versions = self._versions.get(name, {})
            chosen = [e for v, e in versions.items() if not version or v == version]
            if not chosen:
                loaded = [v for v, e in sorted(versions.items()) if e.state is State.READY]
                if not versions:
                    raise _not_found(
                        f"model: {shorten(name)!r} is not loaded; loaded models: {self.names()}"
                    )
                raise _not_found(
                    f"version: model {name!r} has no loaded version {version} to unload; its "
                    f"loaded versions: {loaded}"
                )
            if not version:
                self._followed.discard(name)
                self._unloaded_by_admin.add(name)
            for entry in chosen:
                del versions[entry.version]
            if not versions:
                del self._versions[name]
            drains = [self._start_drain(entry) for entry in chosen]
            await self._publish_health(name)
        await asyncio.gather(*drains, return_exceptions=True)
        return chosen

    async def poll(self) -> None:
        """Follow the repository: load each followed model's newest version once its files
        have stopped changing (same on two polls), reload a version whose files changed,
        release versions superseded or removed from disk."""
        if self.repository is None:
            return
        async with self._lock:
            on_disk = scan_repository(self.repository)
            if not self._repository_models:
                self._followed |= set(on_disk) - set(self._versions) - self._unloaded_by_admin
            for name in sorted(set(self._versions) - set(self._static)):
                if name not in on_disk or not on_disk[name]:
                    log.info("model %s: its directory is gone from the repository; unloading", name)
                    for entry in self._versions.pop(name).values():
                        self._start_drain(entry)
                    await self._publish_health(name)
            for name in sorted(self._followed):
                versions = on_disk.get(name)
                if not versions:
                    continue
                newest = max(versions)
                seen = fingerprint(versions[newest])
                previous = self._last_seen.get((name, newest))
                self._last_seen[(name, newest)] = seen
                if seen != previous:
                    continue  # still being written, or new: look again next poll
                current = self._versions.get(name, {}).get(newest)
                if current is not None and current.fingerprint == seen:
                    continue  # loaded as it is on disk (or failed as it is on disk)
                await self._load_version(name, newest, versions[newest], pinned=False)

    async def watch(self, interval: float) -> None:
        """Poll the repository every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll()
            except Exception:
                log.exception("polling the model repository %s failed", self.repository)

    # ---- inside --------------------------------------------------------------------------

    def _repository_versions(self, name: str) -> dict[int, Path]:
        if self.repository is None:
            raise _not_found(
                f"model: {name!r} is not a model of this server and it serves no repository "
                f"(--model-repo); models: {sorted(self._static)}"
            )
        versions = scan_repository(self.repository).get(name)
        if not versions:
            raise _not_found(
                f"model: {name!r} has no version in the repository {self.repository} "
                f"(expected {self.repository / name}/<version>/)"
            )
        return versions

    async def _load_version(
        self,
        name: str,
        version: int,
        path: Path,
        pinned: bool,
        spec: ModelSpec | None = None,
    ) -> ModelVersion:
        """Load (`name`, `version`) from `path` beside whatever serves now; once READY it
        takes the calls, and the version it replaces (the same version's older copy, and for
        a followed model every older unpinned version) is released after its calls."""
        try:
            spec = spec or ModelSpec(
                name,
                path,
                model_settings_file(path.parent / SETTINGS_FILE, self._defaults),
                version,
            )
        except ConfigError as exc:  # reported as this version's failure to load
            spec = ModelSpec(name, path, self._defaults, version)
            settings_error = exc
        else:
            settings_error = None
        entry = ModelVersion(name, version, spec, pinned=pinned, fingerprint=fingerprint(path))
        versions = self._versions.setdefault(name, {})
        previous = versions.get(version)
        if previous is None or previous.state is not State.READY:
            versions[version] = entry  # shown as LOADING (a READY copy keeps serving instead)
        await self._publish_health(name)
        await self._load_into(entry, settings_error=settings_error)
        if entry.state is not State.READY:
            if previous is not None and previous.state is State.READY:
                previous.reason = f"a reload failed, this copy still serves: {entry.reason}"
                versions[version] = previous
            return entry
        versions[version] = entry
        if previous is not None and previous is not entry and previous.engine is not None:
            self._start_drain(previous)
        if name in self._followed and not pinned:
            for older in [e for v, e in versions.items() if v < version and not e.pinned]:
                del versions[older.version]
                self._start_drain(older)
        await self._publish_health(name)
        return entry

    async def _load_into(
        self,
        entry: ModelVersion,
        raise_on_failure: bool = False,
        settings_error: ConfigError | None = None,
    ) -> None:
        """Build, warm up and start `entry`'s engine (READY), or record why not (FAILED)."""
        entry.state = State.LOADING
        try:
            if settings_error is not None:
                raise settings_error
            entry.kind = checkpoint_kind(entry.spec.checkpoint)
            engine = await asyncio.to_thread(self._load_engine, entry.spec)
        except Exception as exc:
            if raise_on_failure:
                raise
            entry.state, entry.reason = State.FAILED, _reason(exc)
            log.error(
                "model %s version %d failed to load from %s: %s",
                entry.name,
                entry.version,
                entry.spec.checkpoint,
                entry.reason,
            )
            return
        engine.start()
        entry.engine, entry.state, entry.reason = engine, State.READY, ""
        entry.idle.set()
        log.info("model %s version %d is serving", entry.name, entry.version)

    def _start_drain(self, entry: ModelVersion) -> asyncio.Task[None]:
        entry.state = State.UNLOADING
        self._draining.append(entry)
        task = asyncio.create_task(self._drain(entry))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)
        return task

    async def _drain(self, entry: ModelVersion) -> None:
        """Wait for the calls on `entry` (at most the drain timeout), then close its engine:
        the sequences it accepted finish first."""
        if entry.engine is not None:
            try:
                await asyncio.wait_for(entry.idle.wait(), self._drain_timeout)
            except TimeoutError:
                log.warning(
                    "model %s version %d: %d calls still on it after %.0f s; closing anyway",
                    entry.name,
                    entry.version,
                    entry.active_calls,
                    self._drain_timeout,
                )
            await entry.engine.close()
        self._draining.remove(entry)
        level = logging.DEBUG if self._quiet_release else logging.INFO
        log.log(level, "model %s version %d released", entry.name, entry.version)

    async def _publish_health(self, name: str) -> None:
        """grpc.health.v1 for `name`: SERVING while a version of it is READY."""
        if self._health is None:
            return
        serving = self.serving_version(name) > 0
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set(name, status)

    async def publish_health(self) -> None:
        """Every known model's health (at start, once the server listens)."""
        for name in {*self._versions, *self._followed}:
            await self._publish_health(name)


def _kind_or_empty(path: Path) -> str:
    try:
        return checkpoint_kind(path)
    except Exception:
        return ""


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 500 else text[:500] + "..."
