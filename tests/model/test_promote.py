"""`retd promote`: a run replaces the committed checkpoint only when it scores a lower held-out
loss, keeping the card's decode defaults and extending the learning curve; on the small
fixture of real embeddings, through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from retd.client.cli import main as cli
from retd.model.checkpoint import load_checkpoint
from retd.model.promote import heldout_loss, promote
from retd.model.train import train

from .test_training import FIXTURE, fixture_config

DEFAULTS = {"repetition_penalty": 1.5, "repetition_ngram_size": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A first run, the committed copy of its checkpoint (with decode defaults and a learning
    curve), a run that goes on from it, and a run of another shape."""
    root = tmp_path_factory.mktemp("promote")
    first = fixture_config(root / "first", max_steps=10, eval_every=5)
    first_checkpoint = train(first, progress=False)
    committed = root / "committed"
    shutil.copytree(first_checkpoint, committed)
    card = json.loads((committed / "card.json").read_text())
    card["decode_defaults"] = DEFAULTS
    (committed / "card.json").write_text(json.dumps(card))
    curve = [
        {**row, "run": "first", "total_minutes": row["minutes"]}
        for row in map(json.loads, (Path(first.out_dir) / "metrics.jsonl").open())
        if "heldout_loss" in row
    ]
    (committed / "learning_curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    on = fixture_config(root / "on", max_steps=20, eval_every=10, init_from=str(first_checkpoint))
    train(on, progress=False)
    other = fixture_config(root / "other", max_steps=2, eval_every=2, architecture="ret_tiny")
    train(other, progress=False)
    return {
        "first": Path(first.out_dir),
        "committed": committed,
        "on": Path(on.out_dir),
        "other": Path(other.out_dir),
    }


def test_a_better_run_is_promoted_and_a_worse_one_is_not(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    committed = runs["committed"]
    before = heldout_loss(committed, FIXTURE, texts=16)
    run_loss = heldout_loss(runs["on"] / "checkpoint", FIXTURE, texts=16)
    assert run_loss < before  # 20 more steps on the fixture

    code = cli(
        ["promote", str(runs["on"]), "--into", str(committed), "--label", "on",
         "--data-dir", str(FIXTURE), "--texts", "16"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().out
    assert "promoted" in capsys.readouterr().out
    assert heldout_loss(committed, FIXTURE, texts=16) == run_loss
    card = load_checkpoint(committed).card
    assert card["decode_defaults"] == DEFAULTS  # the committed card's, kept
    assert card["training"]["steps"] == 20  # the run's card otherwise
    curve = [json.loads(line) for line in (committed / "learning_curve.jsonl").open()]
    assert [row["run"] for row in curve] == ["first", "first", "on", "on"]
    totals = [row["total_minutes"] for row in curve]  # counted on from the first run's end
    assert totals == sorted(totals) and totals[-1] > totals[1]
    weights = (committed / "model.safetensors").read_bytes()

    # the first run's checkpoint is worse than what is committed now: nothing changes
    again = promote(runs["first"], committed, FIXTURE, "first again", texts=16)
    assert not again.promoted and again.after > again.before
    assert (committed / "model.safetensors").read_bytes() == weights
    assert len((committed / "learning_curve.jsonl").read_text().splitlines()) == 4


def test_a_run_of_another_shape_is_refused(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    weights = (runs["committed"] / "model.safetensors").read_bytes()
    code = cli(
        ["promote", str(runs["other"]), "--into", str(runs["committed"]), "--label", "x",
         "--data-dir", str(FIXTURE)]
    )  # fmt: skip
    assert code == 2
    assert "not a continuation" in capsys.readouterr().out
    assert (runs["committed"] / "model.safetensors").read_bytes() == weights
