"""`retd eval MODEL --server ADDRESS`: what a running server's Decode answers, scored beside
retrieval. A bank of the training split answers exactly what retrieval looks up, so its
figures must equal retrieval's; a RET model's answers are generated."""

from __future__ import annotations

import json

import pytest

from retd.client import Client
from retd.client.cli import main
from retd.server.bench.served_eval import evaluate_served, markdown
from tests.conftest import RunningServer
from tests.server.phrase_bank.conftest import BANK, FIXTURE, RET


def test_the_training_split_bank_scores_what_retrieval_scores(client: Client) -> None:
    report = evaluate_served(client, BANK, FIXTURE, limit=6, per_source=3)
    held = report["heldout"]
    assert held["texts"] == 6 and held["sources"] == {"phrase_bank": 6}
    assert held["decode"] == pytest.approx(held["retrieval"], abs=1e-3)
    assert list(report["per_source"]) == ["heldout/"]  # the fixture is unlabelled: one source
    assert report["per_source"]["heldout/"]["texts"] == 3
    generated = evaluate_served(client, RET, FIXTURE, limit=4)
    assert generated["heldout"]["sources"] == {"generated": 4}
    assert generated["heldout"]["retrieval"] == pytest.approx(
        evaluate_served(client, BANK, FIXTURE, limit=4)["heldout"]["decode"], abs=1e-3
    )
    table = markdown(report)
    assert "| heldout | 6 |" in table and "phrase_bank 6" in table


def test_retd_eval_server_prints_the_report(
    served: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", BANK, "--server", served.address, "--data-dir", str(FIXTURE)]
    assert main([*argv, "--limit", "3", "--per-source", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == BANK and report["heldout"]["texts"] == 3
    assert "per_source" not in report
