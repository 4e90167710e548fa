"""The kinds of checkpoint a card names (`kind`) and reading a card, torch-free: the server's
front end (telemetry, the model repository, an engine process's parent) reads them without
loading a model or importing torch. `checkpoint.py` loads and saves the models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RET_KIND = "ret"
PHRASE_BANK_KIND = "phrase_bank"
KINDS = (RET_KIND, PHRASE_BANK_KIND)
CARD_FILE = "card.json"
CARD_FORMAT = "retd-checkpoint/1"

#: The trained RET v2.1 shipped in the package: what `retd serve` serves when given no model.
#: Three blocks of 128 over a 1,792-token BPE (README, "The shipped checkpoint").
DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "ret_v21_bpe1792"


class CheckpointError(Exception):
    """A checkpoint directory that cannot be loaded; the message says exactly what is wrong."""


def read_card(path: Path) -> dict[str, Any]:
    """A card.json of any kind: a JSON object of our format naming a known `kind`."""
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(card, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(card).__name__}")
    if card.get("format") != CARD_FORMAT:
        raise CheckpointError(f"{path} has format {card.get('format')!r}, expected {CARD_FORMAT!r}")
    kind = card.get("kind", RET_KIND)
    if kind not in KINDS:
        raise CheckpointError(f"{path}: unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return card


def checkpoint_kind(directory: str | Path) -> str:
    """The kind of model a checkpoint directory holds, from its card (`ret` when unnamed)."""
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    card_path = Path(directory) / CARD_FILE
    if not card_path.is_file():
        raise CheckpointError(f"checkpoint {directory} is missing {CARD_FILE}")
    return str(read_card(card_path).get("kind", RET_KIND))
