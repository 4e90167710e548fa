"""Telemetry, the calls' interceptor and the configuration never need torch, nor the engine:
what they read of models and sequences is typed structurally (server/observed.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    import retd.server.config
    import retd.server.interceptor
    import retd.server.logs
    import retd.server.telemetry
    from retd.server.telemetry import Telemetry

    Telemetry().observe(list, lambda: 0, device_memory=lambda e: None, rss=lambda: None)
    assert sys.modules["torch"] is None
    engine = [m for m in sys.modules if m in ("retd.server.engine", "retd.server.repository")]
    assert not engine, engine
    print("ok")
    """
)


def test_telemetry_imports_neither_torch_nor_the_engine() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
