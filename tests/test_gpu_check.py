"""`make gpu-check`'s logic, on the CPU: it refuses clearly where there is no GPU (never a silent
skip), each step reports figures or a failure, and the report is one JSON and one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retd.server import gpu_check


def test_without_a_gpu_it_fails_clearly_and_writes_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device, even on a GPU machine
    done = subprocess.run(
        [sys.executable, "-m", "retd.server.gpu_check", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == gpu_check.NO_DEVICE
    assert "no CUDA device" in done.stderr and "--device cpu" in done.stderr
    assert not (tmp_path / "out").exists()


@given(
    passed=st.integers(0, 500),
    failed=st.integers(0, 50),
    skipped=st.integers(0, 50),
)
def test_pytest_summaries_are_counted(passed: int, failed: int, skipped: int) -> None:
    parts = [f"{n} {word}" for n, word in ((failed, "failed"), (passed, "passed")) if n]
    parts += [f"{skipped} skipped"] if skipped else []
    summary = ", ".join(parts) + " in 3.21s"
    assert gpu_check._count(summary, "passed") == passed
    assert gpu_check._count(summary, "failed") == failed
    assert gpu_check._count(summary, "skipped") == skipped


def test_the_raw_step_times_both_dtypes_and_checks_greedy_against_the_cpu(
    checkpoint: Path,
) -> None:
    result = gpu_check.raw(checkpoint, "cpu", quick=True)
    rows = result["rows"]
    for key in ("float32@1", "float32@64", "bfloat16@1", "bfloat16@64"):
        assert rows[key]["ms_per_step"] > 0 and rows[key]["sequences_per_s"] > 0, key
    assert rows["float32_greedy_equal_to_cpu"] == "64/64"  # the CPU against itself


def test_a_failing_step_is_recorded_and_the_exit_status_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> dict[str, object]:
        raise RuntimeError("the device went away")

    def fine(*args: object, **kwargs: object) -> dict[str, object]:
        return {"ok": True, "figure": 1}

    monkeypatch.setattr(gpu_check, "cuda_tests", fine)
    monkeypatch.setattr(gpu_check, "raw", broken)
    monkeypatch.setattr(gpu_check, "server", fine)
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--quick"]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["steps"]["raw"] == {
        "ok": False,
        "error": "RuntimeError: the device went away",
        "seconds": report["steps"]["raw"]["seconds"],
    }
    assert report["steps"]["server"]["ok"] and report["steps"]["memory"]["ok"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| raw | **no** |" in table and "| server | yes |" in table


@pytest.mark.slow
def test_the_server_step_benches_a_real_server_through_the_server_cli(checkpoint: Path) -> None:
    """`python -m retd.server.cli bench`: no `retd` entry point is needed, as on a GPU machine
    whose Python reaches retd through PYTHONPATH alone (where `retd.client.cli` failed)."""
    result = gpu_check.server(checkpoint, "cpu", quick=True)
    assert result["ok"], result
    row = result["rows"]["float32 decode x64"]
    assert row["requests_per_s"] > 0 and row["p50_ms"] > 0 and not row["errors"]
    assert set(result["rows"]) == {"float32 decode x64", "float32 generate x64"}
