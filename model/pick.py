"""The editor's learnt pick: which of a retrieve-edit pool's 2K candidates (K edits, then the K
neighbours they edit, nearest first) to answer, as a linear score over each candidate's
features (FEATURES), fitted to the candidates' sentence chrF against the text whose embedding
was asked (model/fit_pick.py builds the pools and runs the fit).

The served rule without weights is cosine + consensus × agreement; with weights {"cosine": 1,
"agreement": 100 × consensus} this module scores the same (the features' agreement is on a 0–1
scale). Fitted weights also see how far an edit strays from the neighbour it rewrites, how long
it is against the nearest neighbour, and how close that neighbour already is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Each candidate's features, one column each (shapes: a pool has 2K candidates).
FEATURES = (
    "cosine",  # its cosine to the asked embedding (an edit's re-encoding, a neighbour's stored)
    "cosine_to_best",  # cosine less the pool's highest (<= 0)
    "is_edit",  # 1 for an edit, 0 for a neighbour
    "agreement",  # its mean sentence chrF against the rest of the pool, 0..1
    "agreement_to_best",  # agreement less the pool's highest (<= 0)
    "edit_x_nearest",  # an edit's: the nearest neighbour's cosine (0 for neighbours)
    "edit_gain",  # an edit's cosine less its neighbour's
    "edit_fidelity",  # an edit's sentence chrF against the neighbour it rewrites, 0..1
    "rank",  # its neighbour's rank, 0 (nearest) .. 1 (K-th)
    "edit_x_rank",  # rank, for edits only
    "length_ratio",  # log((its length + 1) / (the nearest neighbour's length + 1))
    "abs_length_ratio",  # |length_ratio|
    "duplicates",  # how many of the pool's texts equal it, / 2K
    "neighbour_fidelity",  # a neighbour's: its own edit's chrF against it (0 for edits)
    "nearest_x_cosine",  # the nearest neighbour's: its cosine (0 for every other candidate)
)


def served_weights(consensus: float) -> dict[str, float]:
    """The weights that score as the rule without weights: cosine + consensus × agreement."""
    return {"cosine": 1.0, "agreement": 100.0 * consensus}


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """`weights` as a plain dict of floats, or ValueError naming what is wrong."""
    unknown = sorted(set(weights) - set(FEATURES))
    if unknown:
        raise ValueError(f"editor: pick weights name unknown features {unknown}; known: {FEATURES}")
    checked = {name: float(w) for name, w in weights.items()}
    bad = [name for name, w in checked.items() if not math.isfinite(w)]
    if bad:
        raise ValueError(f"editor: pick weights must be finite numbers, not for {bad}")
    return checked


# `--pick` of `retd add-editor` and retrieve_edit: the editor checkpoint card's fitted pick
# (its "pick" entry; the rule without weights where it has none), that rule, or a file.
PICK_CHOICES = "card, cosine or a JSON file of fit_pick's"


def chosen_weights(choice: str, card: Mapping[str, Any]) -> dict[str, float]:
    """The pick weights `choice` names: "card" (the editor's `card`'s "pick" entry, {} when it
    has none), "cosine" ({}: cosine + consensus × agreement) or the path of a JSON file with a
    "weights" object (model/fit_pick.py's output). ValueError names what is wrong."""
    if choice == "cosine":
        return {}
    if choice == "card":
        entry: Any = card.get("pick", {})
        where = 'the checkpoint card\'s "pick"'
    else:
        path = Path(choice)
        if not path.is_file():
            raise ValueError(f"--pick must be {PICK_CHOICES}; {choice!r} is no file")
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"--pick {choice}: not JSON ({exc})") from None
        where = choice
    weights = entry.get("weights", {}) if isinstance(entry, dict) else None
    if not isinstance(weights, dict) or (choice != "card" and not weights):
        raise ValueError(f'{where} must hold a "weights" object of feature: number')
    return check_weights(weights)


def weight_vector(weights: Mapping[str, float]) -> np.ndarray:
    """(F,) float64: each of FEATURES' weight (0 where `weights` does not name it)."""
    checked = check_weights(weights)
    return np.array([checked.get(name, 0.0) for name in FEATURES])


def fidelity(edits: Sequence[str], neighbours: Sequence[str]) -> np.ndarray:
    """(K,) each edit's sentence chrF against the neighbour it rewrites, 0..1."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    return np.array(
        [chrf.sentence_score(e, [n]).score / 100 for e, n in zip(edits, neighbours, strict=True)]
    )


def pool_features(
    edits: Sequence[str], neighbours: Sequence[str], cosine: np.ndarray, agreed: np.ndarray
) -> np.ndarray:
    """(2K, F) FEATURES of one pool: K `edits`, the K `neighbours` they rewrite (nearest
    first), the 2K candidates' `cosine` to the asked embedding and their `agreed` mean chrF
    against the rest of the pool (decoding_eval.consensus_scores, 0..100)."""
    k = len(edits)
    texts = [*edits, *neighbours]
    cos = np.asarray(cosine, dtype=np.float64)  # (2K,)
    agree = np.asarray(agreed, dtype=np.float64) / 100  # (2K,)
    is_edit = np.r_[np.ones(k), np.zeros(k)]
    rank = np.r_[np.arange(k), np.arange(k)] / max(k - 1, 1)
    own = np.r_[cos[k:], cos[k:]]  # each candidate's neighbour's cosine
    faithful = fidelity(edits, neighbours)  # (K,)
    nearest = cos[k]
    lengths = np.array([len(t) for t in texts], dtype=np.float64)
    length_ratio = np.log((lengths + 1) / (len(neighbours[0]) + 1))
    duplicates = np.array([sum(t == u for u in texts) for t in texts]) / (2 * k)
    columns = {
        "cosine": cos,
        "cosine_to_best": cos - cos.max(),
        "is_edit": is_edit,
        "agreement": agree,
        "agreement_to_best": agree - agree.max(),
        "edit_x_nearest": is_edit * nearest,
        "edit_gain": is_edit * (cos - own),
        "edit_fidelity": np.r_[faithful, np.zeros(k)],
        "rank": rank,
        "edit_x_rank": is_edit * rank,
        "length_ratio": length_ratio,
        "abs_length_ratio": np.abs(length_ratio),
        "duplicates": duplicates,
        "neighbour_fidelity": np.r_[np.zeros(k), faithful],
        "nearest_x_cosine": np.r_[np.zeros(k), nearest, np.zeros(k - 1)],
    }
    return np.stack([columns[name] for name in FEATURES], axis=1)


def learnt_scores(features: np.ndarray, weights: Mapping[str, float]) -> np.ndarray:
    """(..., 2K) each candidate's score: `features` (..., 2K, F) times the weights."""
    return np.asarray(features, dtype=np.float64) @ weight_vector(weights)


def fit(
    features: np.ndarray,
    dropped: np.ndarray,
    target: np.ndarray,
    start: Mapping[str, float],
    steps: int = 300,
    lr: float = 0.5,
    l2: float = 0.1,
    scale: float = 200.0,
) -> dict[str, float]:
    """Weights that maximise the pools' expected `target` (P, 2K) (e.g. sentence chrF / 100)
    under a softmax over each pool's candidates scored by `features` (P, 2K, F), `dropped`
    (P, 2K) candidates never picked: Adam from `start` × `scale` (the softmax's sharpness),
    `l2` × 1e-4 on every weight but cosine's. Scale-free: the argmax is what is served."""
    import torch

    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    never = torch.as_tensor(np.asarray(dropped, dtype=bool))
    y = torch.as_tensor(np.asarray(target, dtype=np.float64))
    w = torch.tensor(weight_vector(start) * scale, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        scores = (x @ w).masked_fill(never, -1e9)  # (P, 2K)
        expected = (torch.softmax(scores, dim=1) * y).sum(dim=1).mean()
        loss = -expected + l2 * (w[1:] ** 2).sum() / 1e4
        opt.zero_grad()
        loss.backward()
        opt.step()
    fitted = w.detach().numpy() / scale
    return {name: round(float(v), 4) for name, v in zip(FEATURES, fitted, strict=True)}
