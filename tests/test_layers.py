"""Imports flow one way: client → protos; server → model, protos; model → nothing of ours above it.

Read from the source with `ast`, every import counts (module level or inside a function), so a
lazy import cannot hide a cycle. `server/bench/` is a load generator built on the public client,
and `server/cli.py` runs the commands that the client's `retd` lists, so these two of the
server may import `retd.client` (never a private module of it). The client reaches the server
and the encoder only through entry points (pyproject.toml), never by import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Which of our packages each package may import, besides itself.
ALLOWED = {
    "client": {"v1"},
    "server": {"model", "v1"},
    "model": set(),
}
EXCEPTIONS = {("server/bench", "client"), ("server/cli.py", "client")}


def our_imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every `retd.*` module that `path` imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("retd.")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("retd."):
            found += [(node.lineno, f"{node.module}")]
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, module in our_imports(path):
            parts = module.split(".")
            target = parts[1]
            if target == package:
                continue
            allowed = ALLOWED[package] | {
                dep for place, dep in EXCEPTIONS if rel == place or rel.startswith(place + "/")
            }
            if target not in allowed:
                bad.append(f"{rel}:{line} imports {module} ({package} may import {allowed})")
            elif any(p.startswith("_") and not p.startswith("__") for p in parts[2:]):
                bad.append(f"{rel}:{line} imports a private module of {target}: {module}")
    return bad


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package: str) -> None:
    assert violations(package) == []


def test_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from retd.server.cli import main\n    import retd.model._x\n")
    assert our_imports(source) == [
        (2, "retd.server.cli"),
        (2, "retd.server.cli.main"),
        (3, "retd.model._x"),
    ]
