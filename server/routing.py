"""The calls' side of the model versions: the versions of every model, by name then version,
and the way a call gets the one that serves it (`lease`: the newest READY version, or the
version it names) for as long as it uses it. What is in the table, and when, is the
registry's (server/repository.py: loads, unloads, hot reload), which builds on this one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from retd.server.engine import ServingEngine
from retd.server.errors import ErrorKind, ServeError, not_found
from retd.server.validation import shorten
from retd.server.versions import ModelVersion, State


class VersionTable:
    """The model versions calls can be routed to, and the calls' way to them (`lease`)."""

    default_model: str  # the model of calls that name none

    def __init__(self, default_model: str = "") -> None:
        self.default_model = default_model
        self._versions: dict[str, dict[int, ModelVersion]] = {}
        self._draining: list[ModelVersion] = []  # out of the table; the calls on them finish

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
            raise not_found(
                f"model: {shorten(name)!r} is not loaded; expected one of {self.names()}"
            )
        ready = {v: e for v, e in versions.items() if e.state is State.READY}
        if version:
            if version in ready:
                return ready[version]
            raise not_found(
                f"version: model {name!r} has no version {version} loaded; loaded versions: "
                f"{sorted(ready)} (0 means the newest)"
            )
        if ready:
            return ready[max(ready)]
        if any(e.state is State.LOADING for e in versions.values()):
            raise ServeError(ErrorKind.UNAVAILABLE, f"model {name!r} is loading; retry shortly")
        reasons = "; ".join(f"version {e.version}: {e.reason}" for e in versions.values())
        raise not_found(f"model: {name!r} is not serving ({reasons or 'not loaded'})")

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

    def engines(self) -> list[ServingEngine]:
        """Every engine with work or able to take it (READY and UNLOADING versions). Safe to
        call from another thread (the metrics exporter's): it iterates snapshots, each taken
        in one step under the GIL, never a dict the event loop may be changing."""
        entries = [e for versions in list(self._versions.values()) for e in list(versions.values())]
        return [e.engine for e in [*entries, *list(self._draining)] if e.engine is not None]
