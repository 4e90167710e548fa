"""The editor's learnt pick (model/pick.py): its features, the rule it generalises, its fit,
and the weights a card or a file names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retd.model.decoding_eval import consensus_scores
from retd.model.pick import (
    FEATURES,
    check_weights,
    chosen_weights,
    fit,
    learnt_scores,
    pool_features,
    served_weights,
)
from retd.model.retrieve_edit import EditSettings, Pools, agreement, pick

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "........", "--"]
texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)


@st.composite
def pools(draw: st.DrawFn) -> Pools:
    n, k = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    edits = [[draw(texts) for _ in range(k)] for _ in range(n)]
    neighbours = [[draw(texts) for _ in range(k)] for _ in range(n)]
    seed = draw(st.integers(0, 2**32 - 1))
    cosine = np.random.default_rng(seed).uniform(-1, 1, (n, 2 * k)).astype(np.float32)
    return Pools(edits, neighbours, cosine)


@settings(max_examples=40, deadline=None)
@given(pools(), st.sampled_from([0.0, 0.005, 0.05]), st.booleans())
def test_the_rules_weights_pick_what_the_rule_picks(
    pool: Pools, consensus: float, drop: bool
) -> None:
    rule = pick(pool, consensus, drop_degenerate=drop)
    learnt = pick(pool, consensus, drop_degenerate=drop, weights=served_weights(consensus))
    assert learnt.tolist() == rule.tolist()


def test_each_feature_is_what_its_name_says() -> None:
    edits = ["The cat sat.", "The cat sat."]
    neighbours = ["The cat sat on the mat.", "A dog."]
    cosine = np.array([0.9, 0.5, 0.8, 0.6])
    agreed = consensus_scores([*edits, *neighbours])
    phi = dict(zip(FEATURES, pool_features(edits, neighbours, cosine, agreed).T, strict=True))
    assert phi["cosine"].tolist() == cosine.tolist()
    assert phi["cosine_to_best"].max() == 0 and phi["cosine_to_best"][1] == pytest.approx(-0.4)
    assert phi["is_edit"].tolist() == [1, 1, 0, 0]
    assert phi["agreement"] == pytest.approx(agreed / 100)
    assert phi["edit_x_nearest"].tolist() == [0.8, 0.8, 0, 0]
    assert phi["edit_gain"] == pytest.approx([0.1, -0.1, 0, 0])
    fid = phi["edit_fidelity"]
    assert fid[0] > fid[1] >= 0 and fid[2:].tolist() == [0, 0]  # the first edit stays closer
    assert phi["neighbour_fidelity"].tolist() == [0, 0, *fid[:2]]
    assert phi["rank"].tolist() == [0, 1, 0, 1] and phi["edit_x_rank"].tolist() == [0, 1, 0, 0]
    assert phi["length_ratio"][2] == 0 and phi["length_ratio"][0] == pytest.approx(np.log(13 / 24))
    assert phi["abs_length_ratio"][0] == -phi["length_ratio"][0]
    assert phi["duplicates"].tolist() == [0.5, 0.5, 0.25, 0.25]
    assert phi["nearest_x_cosine"].tolist() == [0, 0, 0.8, 0]


def test_a_fit_finds_what_the_cosine_misses() -> None:
    # Pools whose best candidate is the longest one, which cosine alone does not see.
    rng = np.random.default_rng(0)
    k, n = 4, 120

    def make(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        phi = np.zeros((n, 2 * k, len(FEATURES)))
        phi[..., FEATURES.index("cosine")] = rng.uniform(0.5, 0.9, (n, 2 * k))
        lengths = rng.normal(0, 1, (n, 2 * k))
        phi[..., FEATURES.index("length_ratio")] = lengths
        target = (lengths == lengths.max(axis=1, keepdims=True)).astype(float)
        return phi, np.zeros((n, 2 * k), dtype=bool), target

    phi, dropped, target = make(n)
    start = served_weights(0.0)
    weights = fit(phi, dropped, target, start, steps=200)
    assert set(weights) == set(FEATURES) and weights["length_ratio"] > 0
    test_phi, _, test_target = make(n)
    rows = np.arange(n)
    before = test_target[rows, learnt_scores(test_phi, start).argmax(axis=1)].mean()
    after = test_target[rows, learnt_scores(test_phi, weights).argmax(axis=1)].mean()
    assert after > before + 0.5  # from chance (1 in 8) to nearly always the longest


def test_weights_come_from_the_card_a_file_or_the_rule(tmp_path: Path) -> None:
    card = {"pick": {"weights": {"cosine": 1.0, "length_ratio": 0.02}}}
    assert chosen_weights("card", card) == {"cosine": 1.0, "length_ratio": 0.02}
    assert chosen_weights("card", {}) == {}  # a card without a fitted pick: the rule
    assert chosen_weights("cosine", card) == {}
    path = tmp_path / "pick.json"
    path.write_text(json.dumps({"weights": {"agreement": 2}, "pools": 3}))
    assert chosen_weights(str(path), {}) == {"agreement": 2.0}
    for text, message in [
        ('{"weights": {"colour": 1}}', "unknown features \\['colour'\\]"),
        ('{"weights": {"cosine": "NaN"}}', "finite numbers, not for \\['cosine'\\]"),
        ('{"weights": {}}', 'must hold a "weights" object'),
        ("[1, 2]", 'must hold a "weights" object'),
        ("{", "not JSON"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            chosen_weights(str(path), {})
    with pytest.raises(ValueError, match="'nowhere.json' is no file"):
        chosen_weights("nowhere.json", {})
    with pytest.raises(ValueError, match="unknown features"):
        EditSettings(pick_weights={"colour": 1.0})
    assert EditSettings(pick_weights={"cosine": 2}).pick_weights == check_weights({"cosine": 2.0})


def test_a_learnt_pick_is_served_by_an_editor_with_those_weights() -> None:
    pool = Pools([["short", "a much longer edit"]], [["near", "far"]], np.array([[0.8, 0.79,
                 0.7, 0.6]]))  # fmt: skip
    assert pick(pool).tolist() == [0]
    longer = {"cosine": 1.0, "length_ratio": 1.0}
    assert EditSettings(consensus=0, pick_weights=longer).pick(pool).tolist() == [1]
    assert EditSettings(consensus=0).pick(pool, agreement(pool)).tolist() == [0]
