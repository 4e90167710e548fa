"""`retd promote RUN --into CHECKPOINT`: a training run's checkpoint becomes the committed one
only when it is measured better, so training accumulates across sessions.

    retd train --config model/configs/ret_v21_bpe_warm.toml --set out_dir=build/warm7 ...
    retd promote build/warm7 --into model/checkpoints/ret_v21_bpe --label "run 7: ..."
    retd eval model/checkpoints/ret_v21_bpe --per-source 50     # the card's figures, anew

Both checkpoints are scored on the same held-out texts (the first `texts` of the held-out
split in `heldout_rows` order, loss per byte as training reports it). If the run's loss is
lower, its weights, tokenizer and card replace the committed ones; the committed card's
`decode_defaults` (what `Decode` uses unless a caller says otherwise) are kept; and the run's
evaluations are appended to the checkpoint's `learning_curve.jsonl`, labelled, their minutes
counted on from where the curve ended. Otherwise nothing is written. A run of another shape
or over another tokenizer is not a continuation and is refused.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .embed import EmbeddedSplit, load_split
from .loss import heldout_losses, heldout_set

CURVE = "learning_curve.jsonl"
COPIED = ("model.safetensors", "card.json", "tokenizer.json")


@dataclass(frozen=True)
class Promotion:
    """What `promote` measured and did."""

    before: float  # held-out loss per byte of the committed checkpoint
    after: float  # and of the run's
    promoted: bool
    curve_rows: int = 0  # evaluations appended to the learning curve
    total_minutes: float = 0.0  # training minutes of the committed checkpoint, all runs


def heldout_loss(checkpoint: Path, data_dir: Path, texts: int = 256) -> float:
    """A checkpoint's loss per byte on the first `texts` held-out texts (training's own
    held-out figure: the same texts, the same measure)."""
    return _losses([checkpoint], load_split(data_dir, "heldout"), texts)[0]


def _losses(checkpoints: list[Path], split: EmbeddedSplit, texts: int) -> list[float]:
    """Each checkpoint's held-out loss per byte on `heldout_set`'s texts of `split` (encoded
    once: the checkpoints share a tokenizer and a length)."""
    loaded = [load_checkpoint(path, device="cpu") for path in checkpoints]
    first = loaded[0]
    n = min(texts, len(split.texts))
    _, embeddings, encoded = heldout_set(split, n, first.config.max_length, first.tokenizer)
    return [heldout_losses(c.model, embeddings, encoded, c.tokenizer)[0] for c in loaded]


def promote(run_dir: Path, into: Path, data_dir: Path, label: str, texts: int = 256) -> Promotion:
    """Replace the checkpoint `into` by `run_dir`/checkpoint if that scores a lower held-out
    loss (see the module's docstring); raises ValueError for a run that does not continue it."""
    source = run_dir / "checkpoint"
    old_card = _card(into)
    new_card = _card(source)
    if new_card.get("architecture") != old_card.get("architecture") or new_card.get(
        "config"
    ) != old_card.get("config"):
        raise ValueError(
            f"{source} is not a continuation of {into}: its architecture or shape differs"
        )
    if _read(source / "tokenizer.json") != _read(into / "tokenizer.json"):
        raise ValueError(f"{source} is not a continuation of {into}: its tokenizer differs")
    before, after = _losses([into, source], load_split(data_dir, "heldout"), texts)
    if not after < before:
        return Promotion(before, after, promoted=False)
    curve = _curve_rows(into / CURVE)
    start = _curve_end(curve, old_card)
    steps = new_card.get("training", {}).get("steps")
    added = [
        {**{k: v for k, v in row.items() if k != "sample"}, "run": label,
         "total_minutes": round(start + row["minutes"], 2)}
        for row in _curve_rows(run_dir / "metrics.jsonl")
        if "heldout_loss" in row and (steps is None or row["step"] <= steps)
    ]  # fmt: skip
    for name in COPIED:
        if (source / name).exists():
            shutil.copyfile(source / name, into / name)
    if "decode_defaults" in old_card:
        new_card["decode_defaults"] = old_card["decode_defaults"]
    (into / "card.json").write_text(json.dumps(new_card, indent=2, sort_keys=True) + "\n")
    (into / CURVE).write_text("".join(json.dumps(row) + "\n" for row in curve + added))
    minutes = float(new_card.get("training", {}).get("minutes", 0.0))
    return Promotion(before, after, True, len(added), round(start + minutes, 1))


def _card(checkpoint: Path) -> dict[str, Any]:
    card: dict[str, Any] = json.loads((checkpoint / "card.json").read_text(encoding="utf-8"))
    return card


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def _curve_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _curve_end(curve: list[dict[str, Any]], card: dict[str, Any]) -> float:
    """Where the committed checkpoint's training ended, in minutes over all its runs: its
    last run began at (last row's total - its minutes) and lasted the card's minutes (which
    the card rounds to 0.1: never before the last row)."""
    minutes = float(card.get("training", {}).get("minutes", 0.0))
    if not curve:
        return minutes
    last = curve[-1]
    total = float(last["total_minutes"])
    return max(total, total - float(last["minutes"]) + minutes)
