"""One version of one model: its record (`ModelVersion`, its `State`, the admin `List`'s
`VersionStatus`), where repository versions come from on disk (`scan_repository`,
`fingerprint`, `repository_spec`), and its life: loading and starting its engine
(`load_into`), and releasing it once the calls on it have finished (`release`).

Which version serves which call, and when versions are loaded and released, is the
registry's (server/repository.py), which imports this module (never the other way).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from retd.model.kinds import checkpoint_kind
from retd.server import heap
from retd.server.config import ConfigError, ModelSettings, ModelSpec, model_settings_file
from retd.server.engine import ServingEngine

# The registry's logger: every line about a model version's load and release carries one name.
log = logging.getLogger("retd.server.repository")

# A repository model's own per-model settings, beside its version directories.
SETTINGS_FILE = "serving.toml"

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
    engine: ServingEngine | None = None
    pinned: bool = False  # loaded by name and version: the watcher leaves it alone
    active_calls: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ready_engine(self) -> ServingEngine:
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


# ---- the repository on disk ----------------------------------------------------------------


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


def repository_spec(
    name: str, path: Path, version: int, defaults: ModelSettings
) -> tuple[ModelSpec, ConfigError | None]:
    """The spec of the repository version in `path`: the settings of its model's
    serving.toml (beside the version directories), else `defaults`. A serving.toml that
    cannot be used comes back as the error to report as this version's failure to load
    (with `defaults` in the spec)."""
    try:
        settings = model_settings_file(path.parent / SETTINGS_FILE, defaults)
    except ConfigError as exc:
        return ModelSpec(name, path, defaults, version), exc
    return ModelSpec(name, path, settings, version), None


def kind_or_empty(path: Path) -> str:
    """The kind of the checkpoint in `path` (its card's); "" when it cannot be read."""
    try:
        return checkpoint_kind(path)
    except Exception:
        return ""


# ---- one version's life --------------------------------------------------------------------


async def load_into(
    entry: ModelVersion,
    load: Callable[[ModelSpec], ServingEngine],
    raise_on_failure: bool = False,
    settings_error: ConfigError | None = None,
) -> None:
    """Build, warm up (`load`, in a thread) and start `entry`'s engine (READY), or record
    why not (FAILED; raised instead with `raise_on_failure`)."""
    entry.state = State.LOADING
    try:
        if settings_error is not None:
            raise settings_error
        entry.kind = checkpoint_kind(entry.spec.checkpoint)
        engine = await asyncio.to_thread(load, entry.spec)
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
    heap.settle()  # the model's objects live as long as it serves: collected no more
    log.info("model %s version %d is serving", entry.name, entry.version)


async def release(entry: ModelVersion, timeout: float) -> None:
    """Wait for the calls on `entry` (at most `timeout` seconds), then close its engine:
    the sequences it accepted finish first."""
    if entry.engine is None:
        return
    try:
        await asyncio.wait_for(entry.idle.wait(), timeout)
    except TimeoutError:
        log.warning(
            "model %s version %d: %d calls still on it after %.0f s; closing anyway",
            entry.name,
            entry.version,
            entry.active_calls,
            timeout,
        )
    await entry.engine.close()
    if entry.active_calls == 0:  # no call holds it (one past the timeout still might)...
        entry.engine = None
    heap.released()  # ...so it goes, its reference cycles too (frozen since it loaded)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 500 else text[:500] + "..."
