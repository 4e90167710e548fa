"""Retrieve, edit, verify: the pool's picks, the edits' order, and a measured run on the
embedded fixture with the real encoder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retd.model.batches import encode_texts
from retd.model.checkpoint import init_checkpoint, load_checkpoint
from retd.model.decoding_eval import Decoder, consensus_scores
from retd.model.embed import load_split
from retd.model.evaluate import heldout_rows, nearest, text_scores
from retd.model.generation import generate
from retd.model.pointer import PointerRET
from retd.model.retrieve_edit import (
    Editor,
    EditSettings,
    Pools,
    degenerate,
    edit_after,
    markdown,
    parse_args,
    pick,
    run,
)

FIXTURE = Path(__file__).parents[1] / "data" / "embedded"
POINTER = Path(__file__).parents[2] / "model/checkpoints/ret_v21_bpe1792_pointer"

words = st.text(alphabet="abc xyz", min_size=1, max_size=10)


@st.composite
def pools(draw: st.DrawFn) -> Pools:
    n, k = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    texts = st.lists(st.lists(words, min_size=k, max_size=k), min_size=n, max_size=n)
    cosine = draw(st.lists(st.floats(-1, 1), min_size=n * 2 * k, max_size=n * 2 * k))
    return Pools(draw(texts), draw(texts), np.array(cosine).reshape(n, 2 * k))


@settings(max_examples=80, deadline=None)
@given(pools(), st.sampled_from([0.0, 0.005, 1e6]))
def test_the_pick_is_the_best_scored_candidate_and_retrieval_the_nearest(
    pool: Pools, weight: float
) -> None:
    k = len(pool.edits[0])
    assert pick(pool, edits=False).tolist() == [k] * len(pool.edits)  # the nearest neighbour
    chosen = pick(pool, weight)
    for row, c in enumerate(chosen.tolist()):
        texts = pool.texts(row)
        agreement = consensus_scores(texts)
        score = pool.cosine[row] + weight * agreement
        assert score[c] == score.max()
        if weight == 0:  # by cosine alone: never below retrieval's
            assert pool.cosine[row, c] >= pool.cosine[row, k]
        if weight == 1e6:  # agreement rules: the pool's consensus
            assert agreement[c] == pytest.approx(agreement.max())


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab .-", max_size=12), st.sampled_from([" zzzz", " ....", " -- a, adv."]))
def test_an_edit_is_degenerate_when_it_adds_a_run_or_a_dictionary_tail(
    phrase: str, added: str
) -> None:
    assert not degenerate(phrase, phrase)  # nothing added: never
    both = phrase + " aaaa -- b"  # a phrase that has a run and a tail: nothing can add them
    assert not degenerate(both + added, both)
    clean = re.sub(r"(\S)\1{3,}", "", phrase).replace(" -- ", " ")
    if re.search(r"(\S)\1{3,}", clean) is None and " -- " not in clean:
        assert degenerate(clean + added, clean)  # it adds one
        assert not degenerate(clean + "ok", clean)  # no mark, not even at the seam


def test_dropping_degenerate_edits_leaves_every_other_pick_alone() -> None:
    phrase, garbage, fine = "A phrase.", 'A phrase -- Short"ic, adv.', "A phrase, edited."
    cosine = np.array([[0.9, 0.8, 0.5, 0.4], [0.3, 0.8, 0.5, 0.4], [0.9, 0.2, 0.5, 0.4]])
    pool = Pools(
        [[garbage, fine], [garbage, fine], [garbage, "Dots........"]],
        [[phrase, phrase], [phrase, phrase], [phrase, "Dots."]],
        cosine,
    )
    assert pick(pool).tolist() == [0, 1, 0]  # by cosine, the garbage wins rows 0 and 2
    # row 0: the next best (the fine edit); row 1 untouched; row 2: both edits degenerate, so
    # the nearest neighbour
    assert pick(pool, drop_degenerate=True).tolist() == [1, 1, 2]
    assert pick(pool, 0.005, drop_degenerate=True)[2] == 2  # agreement cannot bring one back

    class Fixed(Editor):  # the answers of these pools, as a bank's editor gives them
        def pools(self, *args: object, **kwargs: object) -> Pools:
            return pool

    expected = {
        True: [(fine, 1, True), (fine, 1, True), (phrase, 0, False)],
        False: [(garbage, 0, True), (fine, 1, True), (garbage, 0, True)],
    }
    for drop, answers in expected.items():
        settings = EditSettings(consensus=0, drop_degenerate=drop)
        served = Fixed(None, None, None, settings)  # type: ignore[arg-type]
        got = served.answers(np.zeros((3, 768)), pool.neighbours, cosine[:, 2:])
        assert [(text, which, edited) for text, _, which, edited in got] == answers


def test_each_edit_is_decoded_after_its_own_neighbour() -> None:
    loaded = load_checkpoint(POINTER)  # the kept pointer weights: edits that follow the prefix
    model = PointerRET.of(loaded.model).eval()
    tokenizer, limit = loaded.tokenizer, model.config.max_length
    emb = torch.from_numpy(load_split(FIXTURE, "heldout").embeddings[:3].astype(np.float32))
    neighbours = [["The cat sat on the mat.", "a small dog"], ["Stock prices fell.", "rain"],
                  ["A word of the day.", "To be or not to be."]]  # fmt: skip
    decoder, cut = Decoder.parse("rp=1.5,rpn=2,max=12"), 8  # cut: neighbour tokens read
    edits = edit_after(model, tokenizer, emb, neighbours, decoder, max_prefix=cut, batch_size=2)
    assert [len(row) for row in edits] == [2, 2, 2]
    for r, row in enumerate(neighbours):
        for k, text in enumerate(row):
            prefix = [*encode_texts([text], limit, tokenizer)[0][:cut].tolist(), 0]
            alone = generate(model, emb[r : r + 1], [decoder.params(limit)], use_cache=False,
                             tokenizer=tokenizer, prefixes=[prefix])  # fmt: skip
            assert edits[r][k] == alone[0].text
    assert all(edits[r][0] != edits[r][1] for r in range(3))  # the neighbour matters


def test_a_run_scores_every_pick_beside_retrieval_from_the_same_bank(tmp_path: Path) -> None:
    init = init_checkpoint(tmp_path / "init", architecture="ret_tiny")
    argv = [str(init), "--data-dir", str(FIXTURE), "--k", "2", "--limit", "6",
            "--per-source", "3", "--decoder", "max=12", "--max-prefix", "8",
            "--encoder-precision", "float32",  # CI never compiles the bfloat16 path
            "--save-pools", str(tmp_path / "pools.json")]  # fmt: skip
    report = run(parse_args(argv))
    held, train = load_split(FIXTURE, "heldout"), load_split(FIXTURE, "train")
    rows = heldout_rows(len(held.texts), 6)
    refs = [held.texts[i] for i in rows]
    idx, sims = nearest(held.embeddings[rows], train.embeddings)
    retrieval = report["heldout"]["retrieval"]
    assert retrieval["chrf"] == round(text_scores([train.texts[i] for i in idx], refs)["chrf"], 2)
    assert retrieval["cosine"] == pytest.approx(float(sims.mean()), abs=1e-4)
    assert report["bank_texts"] == len(train.texts) and report["heldout"]["texts"] == 6
    assert report["encoder_precision"] == "float32" and report["drop_degenerate"] is True
    by_cosine = report["heldout"]["edits_and_neighbours_by_cosine"]
    assert by_cosine["cosine"] >= retrieval["cosine"]  # the pool holds the nearest
    assert retrieval["edit_share"] == 0 and report["heldout"]["edit_of_nearest"]["edit_share"] == 1
    assert list(report["per_source"]) == ["heldout/"]  # the fixture is unlabelled: one source
    assert report["per_source"]["heldout/"]["texts"] == 3
    table = markdown(report)
    assert "| edits_and_neighbours_by_cosine |" in table and "| heldout/ | 3 |" in table
    assert "| source | texts | retrieval | edits_and_neighbours_by_cosine |" in table
    assert table.splitlines()[-1].count("|") == 2 + 2 + 3  # retrieval, two picks, served
    kept = run(parse_args([*argv[:-2], "--keep-degenerate"]))
    assert kept["drop_degenerate"] is False
    assert "served_without_weights" not in report["heldout"]  # ret_tiny's card: no pick
    longer = {"cosine": 1.0, "length_ratio": 1.0}
    (tmp_path / "pick.json").write_text(json.dumps({"weights": longer}))
    learnt = run(parse_args([*argv[:-2], "--pick", str(tmp_path / "pick.json")]))["heldout"]
    assert learnt["served_without_weights"] == report["heldout"]["served"]  # the rule, beside
    saved = json.loads((tmp_path / "pools.json").read_text())  # every text measured, in order
    assert saved["texts"] == refs + [held.texts[i] for i in range(3)]
    assert [len(row) for row in saved["edits"]] == [2] * 9 and np.shape(saved["cosine"]) == (9, 4)
    assert [row[0] for row in saved["neighbours"][:6]] == [train.texts[i] for i in idx]
    # "served" is the settings' pick (consensus, degenerate edits out) of those pools
    held_pools = Pools(saved["edits"][:6], saved["neighbours"][:6], np.array(saved["cosine"][:6]))
    chosen = pick(held_pools, 0.005, drop_degenerate=True)
    answers = [held_pools.texts(r)[c] for r, c in enumerate(chosen.tolist())]
    assert report["heldout"]["served"]["chrf"] == round(text_scores(answers, refs)["chrf"], 2)
    chosen = pick(held_pools, 0.005, drop_degenerate=True, weights=longer)
    answers = [held_pools.texts(r)[c] for r, c in enumerate(chosen.tolist())]
    assert learnt["served"]["chrf"] == round(text_scores(answers, refs)["chrf"], 2)
    for wrong in (["--k", "0"], ["--limit", "0"]):
        with pytest.raises(SystemExit):
            parse_args([str(init), *wrong])
