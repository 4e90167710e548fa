"""A phrase bank's editor: a RET checkpoint kept inside the bank's directory (`editor/`) and
the settings under the card's "editor" key. A bank with an editor answers `Decode` by
retrieve, edit, verify (`retd.model.retrieve_edit.Editor`): its K nearest phrases, the model's
edit after each, and the one of those 2K texts whose re-encoding is nearest the asked embedding
(plus the pool's agreement), or with `pick_weights` (by default the checkpoint card's fitted
pick) the best by the learnt pick (model/pick.py). Its other answers (Generate's nearest
phrases, a hybrid Decode's first look) stay the bank's plain search.

    retd add-editor BANK CHECKPOINT [--k 16] [--consensus 0.005] [--decoder rp=1.5,rpn=2,eos=-3]
        [--max-prefix 64] [--no-pointer] [--encoder-precision auto] [--keep-degenerate]
        [--pick card|cosine|PICK.json]
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CARD_FILE, CheckpointError, load_checkpoint, write_card
from .encoder import Encode
from .phrase_bank import BANK_ENCODER, read_bank_card
from .pick import chosen_weights
from .retrieve_edit import Editor, EditSettings

EDITOR_DIR = "editor"
EDITOR_KEY = "editor"


def add_editor(
    bank: Path, checkpoint: Path, settings: EditSettings, pick: str = "card"
) -> dict[str, Any]:
    """Copy `checkpoint` into `bank`/editor and record `settings` in the bank's card (the
    embeddings and phrases are untouched), their pick weights `pick`'s (`pick.chosen_weights`:
    by default the checkpoint card's fitted pick). Returns the card's "editor" entry."""
    card = read_bank_card(bank / CARD_FILE)
    loaded = load_checkpoint(checkpoint)  # a RET checkpoint that loads, or CheckpointError
    settings = replace(settings, pick_weights=chosen_weights(pick, loaded.card))
    encoder = loaded.card.get("encoder", {})
    if encoder.get("name") != card["encoder"].get("name", BANK_ENCODER["name"]):
        raise CheckpointError(
            f"{checkpoint} decodes {encoder.get('name')!r} embeddings but bank {bank} holds "
            f"{card['encoder'].get('name')!r} ones; both must read the same encoder's"
        )
    target = bank / EDITOR_DIR
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(checkpoint, target)
    entry = {**asdict(settings), "checkpoint": EDITOR_DIR, "weights_sha256": loaded.sha256}
    card[EDITOR_KEY] = entry
    write_card(bank, card)
    return entry


def editor_settings(card: dict[str, Any], bank: Path) -> EditSettings | None:
    """The card's editor settings, checked (None when the bank has no editor)."""
    entry = card.get(EDITOR_KEY)
    if entry is None:
        return None
    names = {f.name for f in fields(EditSettings)}
    if not isinstance(entry, dict):
        raise CheckpointError(f"{bank / CARD_FILE}: {EDITOR_KEY!r} must be an object")
    try:
        return EditSettings(**{k: v for k, v in entry.items() if k in names})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{bank / CARD_FILE}: {EDITOR_KEY!r}: {exc}") from None


def load_editor(
    bank: Path,
    card: dict[str, Any],
    device: torch.device,
    encode: Encode | None = None,
) -> Editor | None:
    """The bank's editor on `device` with the sentence encoder (`encode`: the installed
    all-mpnet-base-v2 by default), or None when the bank has none."""
    settings = editor_settings(card, bank)
    if settings is None:
        return None
    loaded = load_checkpoint(bank / EDITOR_DIR, device=device)
    named = card[EDITOR_KEY].get("weights_sha256", loaded.sha256)
    if named != loaded.sha256:
        raise CheckpointError(
            f"{bank / EDITOR_DIR} has sha256 {loaded.sha256} but {bank / CARD_FILE} names "
            f"{named}: the editor is not the one the card describes"
        )
    if encode is None:
        from .encoder import SentenceEncoder

        encode = SentenceEncoder.load(precision=settings.encoder, device=str(device)).encode
    return Editor.of(loaded.model, loaded.tokenizer, encode, settings)
