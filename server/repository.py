"""The models a daemon serves, version by version: loading, routing calls, hot reload.

Models come from two places: the command line (`--checkpoint`, `--model`, `[[models]]`),
each served as version 1, and a model repository, a directory `MODEL_REPO/<name>/<version>/`
(version: a positive integer) of checkpoints. Of a repository model, the newest version is
served unless an admin `Load` pins others; `poll()` (the `--watch` loop) follows the
directory: a new version is loaded and warmed up beside the old one, takes every new call
from then on, and the old one is released once the calls already on it have finished.

Calls hold a *lease* on the version that serves them for as long as they use it, so a
version is never closed under a call. A version that fails to load is recorded with its
reason; the others keep serving. Each change of a model's state is reported to whoever
subscribed (`subscribe`: the daemon's health service); the registry knows nothing of gRPC.

One version (its record, its directory, its load and release): server/versions.py; the
calls' side (routing, leases): server/routing.py, which `ModelRegistry` builds on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from retd.model.kinds import RET_KIND
from retd.server.config import ModelSettings, ModelSpec, RepositoryConfig
from retd.server.engine import ServingEngine
from retd.server.errors import ErrorKind, ServeError, not_found
from retd.server.routing import VersionTable
from retd.server.validation import shorten
from retd.server.versions import (
    Fingerprint,
    ModelVersion,
    State,
    VersionStatus,
    fingerprint,
    kind_or_empty,
    load_into,
    release,
    repository_spec,
    scan_repository,
)

log = logging.getLogger(__name__)

NO_REPOSITORY = RepositoryConfig()
MODEL_DEFAULTS = ModelSettings()

# Told (model name, serving) when a version of that model changes state: serving while a
# version of it is READY (the daemon's health service subscribes: server/app.py).
ServingListener = Callable[[str, bool], Awaitable[None]]


class ModelRegistry(VersionTable):
    """Every model version the daemon knows: loads and releases them (at start, by the
    admin, following the repository), and is the calls' way to them (`lease`)."""

    default_model: str  # VersionTable's; when not configured, chosen at start

    def __init__(
        self,
        static: Sequence[ModelSpec],
        load: Callable[[ModelSpec], ServingEngine],
        *,
        repository: RepositoryConfig = NO_REPOSITORY,
        model_defaults: ModelSettings = MODEL_DEFAULTS,
        default_model: str = "",
    ) -> None:
        """`load` builds a warm, not yet started engine (it runs in a thread).
        `repository`: the model repository, the models of it to serve (empty: all of them)
        and the drain timeout of every version; `model_defaults`: the settings repository
        models are loaded with (unless their serving.toml says otherwise). Whoever follows
        the models' states (health) subscribes to them: `subscribe`."""
        self._static = {spec.name: spec for spec in static}
        self._load_engine = load
        self.repository = repository.path
        self._repository_models = repository.models
        self._defaults = model_defaults
        super().__init__(default_model)
        # Why the default model is that one, for the start-up log.
        self.default_reason = "set by --default-model" if default_model else ""
        self._drain_timeout = repository.unload_timeout
        self._listeners: list[ServingListener] = []
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
                await load_into(entry, self._load_engine, raise_on_failure=True)
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

    # ---- the admin side ------------------------------------------------------------------

    def status(self, name: str = "") -> list[VersionStatus]:
        """Every version known: loaded, loading, draining, failed, and (for a repository)
        on disk but not loaded."""
        rows: dict[tuple[str, int], VersionStatus] = {}
        if self.repository is not None:
            for model, versions in scan_repository(self.repository).items():
                for version, path in versions.items():
                    rows[(model, version)] = VersionStatus(
                        model, version, State.AVAILABLE, "", kind_or_empty(path), path, False, 0
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
                    raise not_found(
                        f"version: model {name!r} is served from {spec.checkpoint} as version "
                        f"{spec.version}; it has no version {version}"
                    )
                entry = await self._load_version(name, spec.version, spec.checkpoint, True, spec)
            else:
                versions = self._repository_versions(name)
                if version and version not in versions:
                    raise not_found(
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
                    raise not_found(
                        f"model: {shorten(name)!r} is not loaded; loaded models: {self.names()}"
                    )
                raise not_found(
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
            await self._report(name)
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
                    await self._report(name)
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
            raise not_found(
                f"model: {name!r} is not a model of this server and it serves no repository "
                f"(--model-repo); models: {sorted(self._static)}"
            )
        versions = scan_repository(self.repository).get(name)
        if not versions:
            raise not_found(
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
        settings_error = None  # a serving.toml that cannot be used: this version's failure
        if spec is None:
            spec, settings_error = repository_spec(name, path, version, self._defaults)
        entry = ModelVersion(name, version, spec, pinned=pinned, fingerprint=fingerprint(path))
        versions = self._versions.setdefault(name, {})
        previous = versions.get(version)
        if previous is None or previous.state is not State.READY:
            versions[version] = entry  # shown as LOADING (a READY copy keeps serving instead)
        await self._report(name)
        await load_into(entry, self._load_engine, settings_error=settings_error)
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
        await self._report(name)
        return entry

    def _start_drain(self, entry: ModelVersion) -> asyncio.Task[None]:
        entry.state = State.UNLOADING
        self._draining.append(entry)
        task = asyncio.create_task(self._drain(entry))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)
        return task

    async def _drain(self, entry: ModelVersion) -> None:
        """Release `entry` once its calls finish (at most the drain timeout)."""
        await release(entry, self._drain_timeout)
        self._draining.remove(entry)
        level = logging.DEBUG if self._quiet_release else logging.INFO
        log.log(level, "model %s version %d released", entry.name, entry.version)

    # ---- reporting states ----------------------------------------------------------------

    def subscribe(self, listener: ServingListener) -> None:
        """Have `listener` told (name, serving) each time a version of a model changes state,
        and by `report_serving`."""
        self._listeners.append(listener)

    async def _report(self, name: str) -> None:
        """Tell the listeners whether `name` serves: a version of it is READY."""
        if not self._listeners:
            return
        serving = self.serving_version(name) > 0
        for listener in self._listeners:
            await listener(name, serving)

    async def report_serving(self) -> None:
        """Tell the listeners every known model's state (at start, once the server listens)."""
        for name in {*self._versions, *self._followed}:
            await self._report(name)
