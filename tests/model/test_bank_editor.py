"""`retd add-editor`: a RET checkpoint copied into a phrase bank, its settings on the card,
and everything wrong with either refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from retd.client.cli import main
from retd.model.bank_editor import EDITOR_DIR, editor_settings, load_editor
from retd.model.checkpoint import CheckpointError, init_checkpoint
from retd.model.embed import load_split
from retd.model.phrase_bank import load_phrase_bank, save_phrase_bank
from retd.model.retrieve_edit import EditSettings

FIXTURE = Path(__file__).parents[1] / "data" / "embedded"
POINTER = Path(__file__).parents[2] / "model/checkpoints/ret_v21_bpe1792_pointer"


@pytest.fixture
def bank(tmp_path: Path) -> Path:
    train = load_split(FIXTURE, "train")
    return save_phrase_bank(tmp_path / "bank", train.texts[:20], train.embeddings[:20], name="b")


def test_an_editor_is_copied_in_and_its_settings_recorded(
    bank: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = load_phrase_bank(bank)
    argv = ["add-editor", str(bank), str(POINTER), "--k", "3", "--decoder", "rp=1.2,max=9"]
    assert main(argv) == 0
    entry = json.loads(capsys.readouterr().out)["editor"]
    after = load_phrase_bank(bank)  # the bank itself is untouched and still loads
    assert after.sha256 == before.sha256 and after.bank.phrases == before.bank.phrases
    assert after.card["editor"] == entry
    assert entry["k"] == 3 and entry["decoder"] == "rp=1.2,max=9" and entry["pointer"] is True
    assert entry["consensus"] == EditSettings().consensus  # unset: the default
    assert entry["encoder"] == "auto"  # resolved where the bank is served (auto_precision)
    assert entry["drop_degenerate"] is True
    copied = sorted(p.name for p in (bank / EDITOR_DIR).iterdir())
    assert copied == sorted(p.name for p in POINTER.iterdir())

    def encode(texts: list[str]) -> np.ndarray:
        return np.ones((len(texts), 768), np.float32)

    editor = load_editor(bank, after.card, after.bank.embeddings.device, encode)
    fitted = json.loads((POINTER / "card.json").read_text())["pick"]["weights"]
    assert entry["pick_weights"] == fitted  # unset --pick: the checkpoint card's fitted pick
    assert editor is not None
    assert editor.settings == EditSettings(3, 0.005, "rp=1.2,max=9", pick_weights=fitted)
    assert load_editor(bank, before.card, after.bank.embeddings.device, encode) is None
    # a second add-editor replaces the first
    argv = ["add-editor", str(bank), str(POINTER), "--no-pointer", "--encoder-precision", "fast"]
    assert main([*argv, "--keep-degenerate"]) == 0
    entry = load_phrase_bank(bank).card["editor"]
    assert entry["pointer"] is False and entry["encoder"] == "fast"
    assert entry["drop_degenerate"] is False
    # a card written before drop_degenerate existed takes its default
    del entry["drop_degenerate"]
    assert editor_settings({"editor": entry}, bank) == EditSettings(
        pointer=False, encoder="fast", drop_degenerate=EditSettings().drop_degenerate,
        pick_weights=fitted,
    )  # fmt: skip
    with pytest.raises(ValueError, match="encoder must be one of"):
        EditSettings(encoder="int4")


def test_the_pick_is_the_cards_the_rule_or_a_fitted_file(bank: Path, tmp_path: Path) -> None:
    assert main(["add-editor", str(bank), str(POINTER), "--pick", "cosine"]) == 0
    assert load_phrase_bank(bank).card["editor"]["pick_weights"] == {}  # cosine + consensus
    fitted = tmp_path / "pick.json"
    fitted.write_text(json.dumps({"weights": {"cosine": 1, "length_ratio": 0.5}}))
    assert main(["add-editor", str(bank), str(POINTER), "--pick", str(fitted)]) == 0
    entry = load_phrase_bank(bank).card["editor"]
    assert entry["pick_weights"] == {"cosine": 1.0, "length_ratio": 0.5}
    settings = editor_settings({"editor": entry}, bank)
    assert settings is not None and settings.pick_weights == entry["pick_weights"]
    del entry["pick_weights"]  # a card written before the learnt pick: the rule
    assert editor_settings({"editor": entry}, bank) == EditSettings()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pick", "nowhere.json"], "--pick must be card, cosine or a JSON file"),
        (["--k", "0"], "k and max_prefix must be at least 1"),
        (["--consensus", "-1"], "consensus >= 0"),
        (["--decoder", "rp"], "decoder 'rp': expected key=value"),
        (["--encoder-precision", "fast", "--max-prefix", "0"], "k and max_prefix"),
    ],
)
def test_add_editor_refuses_bad_settings(
    bank: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["add-editor", str(bank), str(POINTER), *args]) == 2
    assert message in capsys.readouterr().err
    assert "editor" not in load_phrase_bank(bank).card and not (bank / EDITOR_DIR).exists()


def test_add_editor_refuses_what_is_not_a_bank_or_not_a_checkpoint(
    bank: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ret = init_checkpoint(tmp_path / "ret", architecture="ret_tiny")
    assert main(["add-editor", str(ret), str(POINTER)]) == 2
    assert "not a phrase bank" in capsys.readouterr().err
    assert main(["add-editor", str(bank), str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["add-editor", str(bank), str(bank)]) == 2  # a bank cannot edit
    assert "editor" not in load_phrase_bank(bank).card


def test_an_editor_that_is_not_the_one_the_card_names_is_refused(bank: Path) -> None:
    assert main(["add-editor", str(bank), str(POINTER)]) == 0
    card = load_phrase_bank(bank).card
    other = init_checkpoint(bank.parent / "other", architecture="ret_tiny")
    shutil.rmtree(bank / EDITOR_DIR)
    shutil.copytree(other, bank / EDITOR_DIR)
    with pytest.raises(CheckpointError, match="the editor is not the one the card describes"):
        load_editor(bank, card, load_phrase_bank(bank).bank.embeddings.device, lambda t: t)
    card["editor"]["k"] = "many"
    with pytest.raises(CheckpointError, match="'editor'"):
        load_editor(bank, card, load_phrase_bank(bank).bank.embeddings.device, lambda t: t)
