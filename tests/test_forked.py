"""The tests' daemons are forked from a zygote that has imported torch (tests/_forked.py):
a forked child must look, from both sides, like the process `python -m` would have started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests._forked import ForkedProcess, popen

REPO = Path(__file__).resolve().parent.parent


def probe(tmp_path: Path, name: str, *argv: str, **env: str) -> tuple[ForkedProcess, Path]:
    log = tmp_path / f"{name}.log"
    log.touch()
    process = popen("tests._forked_probe", argv, {**os.environ, **env}, tmp_path, log)
    assert isinstance(process, ForkedProcess)
    return process, log


def test_a_forked_child_runs_its_module_as_main_with_its_own_argv_env_and_state(
    tmp_path: Path,
) -> None:
    first, first_log = probe(tmp_path, "a", "3", "--flag", RETD_PROBE="one")
    second, second_log = probe(tmp_path, "b", "0", RETD_PROBE="two")
    assert first.wait(timeout=60) == 3 and first.returncode == 3
    assert second.wait(timeout=60) == 0
    lines = first_log.read_text().splitlines()
    seen = json.loads(lines[0])
    assert seen["argv"] == ["3", "--flag"] and seen["main"] == "__main__"
    assert seen["cwd"] == str(tmp_path) and seen["env"] == "one"
    assert seen["stdin"] == "" and seen["torch"]  # stdin is /dev/null; torch came imported
    assert lines[1:] == ["thread joined", "atexit ran"]  # the interpreter's own exit order
    other = json.loads(second_log.read_text().splitlines()[0])
    assert other["env"] == "two"
    assert other["random"] != seen["random"]  # each child draws its own random state


def test_a_signalled_child_ends_as_popen_reports_it(tmp_path: Path) -> None:
    process, _ = probe(tmp_path, "wait", "wait")
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=0.1)
    assert process.poll() is None
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    process.kill()  # as Popen's: a no-op once it has ended


def test_an_environment_torch_reads_at_import_forks_from_a_zygote_of_its_own(
    tmp_path: Path,
) -> None:
    threads = str(int(os.environ.get("OMP_NUM_THREADS", "1")) + 1)
    plain, plain_log = probe(tmp_path, "plain", "0")
    other, other_log = probe(tmp_path, "other", "0", OMP_NUM_THREADS=threads)
    again, again_log = probe(tmp_path, "again", "0")
    assert (plain.wait(timeout=60), other.wait(timeout=60), again.wait(timeout=60)) == (0, 0, 0)
    seen = [
        json.loads(log.read_text().splitlines()[0]) for log in (plain_log, other_log, again_log)
    ]
    assert seen[1]["threads"] == threads and seen[1]["torch"]
    assert seen[0]["parent"] == seen[2]["parent"] != seen[1]["parent"]


def test_retd_test_fork_0_starts_daemons_cold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RETD_TEST_FORK", "0")
    log = tmp_path / "cold.log"
    process = popen("tests._forked_probe", ["0"], dict(os.environ), REPO, log)
    assert isinstance(process, subprocess.Popen)
    assert process.wait(timeout=60) == 0
    assert json.loads(log.read_text().splitlines()[0])["torch"] is False
