"""A phrase bank that cannot load stops the daemon with the reason; `retd bench` targets a
served bank, and times its search alone (`--raw`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retd.model.checkpoint import CARD_FILE
from retd.model.phrase_bank import save_phrase_bank
from tests.conftest import RunningServer, start_server
from tests.server.phrase_bank.conftest import (
    BANK,
    MEMBERS,
    RET,
    TEXTS,
)
from tests.test_bench import bench

# ---- a bank that cannot load -----------------------------------------------------------------


def test_a_broken_bank_stops_the_daemon_with_the_reason(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    broken = save_phrase_bank(tmp_path / "broken", TEXTS[:3], MEMBERS[:3], name="broken")
    card = json.loads((broken / CARD_FILE).read_text())
    (broken / CARD_FILE).write_text(json.dumps({**card, "phrase_count": 4}))
    with pytest.raises(RuntimeError, match="card.json names 4 phrases but phrases.json holds 3"):
        start_server(tmp_path, ["--model", f"{RET}={checkpoints[RET]}", "--model", f"b={broken}"])


# ---- retd bench ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["decode", "generate", "decode_batch"])
def test_bench_targets_the_bank(served: RunningServer, mode: str) -> None:
    report = bench(
        "--target", served.address, "--model", BANK, "--mode", mode, "-c", "4", "-n", "12",
        "-b", "3",
    )  # fmt: skip
    assert report["errors"] == {} and report["requests"] == 12
    assert report["tokens_per_s"] == 0  # a bank generates no byte: it returns phrases


def test_bench_raw_times_the_banks_search(checkpoints: dict[str, Path]) -> None:
    raw = bench("--raw", "--checkpoint", str(checkpoints[BANK]), "-b", "4", "-n", "8")
    assert raw["raw"] and raw["sequences"] == 8 and raw["batch_size"] == 4
    assert raw["extra"]["phrases"] == 192 and raw["extra"]["dtype"] == "float32"
