"""Retrieve-and-edit (retd.model.neighbour_prefix): the prefixed batches, the neighbour search,
generation after a prefix, a short real run on the embedded fixture, resumed, and the pointer
(PointerRET): where it moves probability, that it learns to copy, and the kept checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retd.model.batches import IGNORE, encode_texts
from retd.model.checkpoint import init_checkpoint, load_checkpoint
from retd.model.decoding import SamplingParams
from retd.model.embed import load_split
from retd.model.evaluate import nearest, nearest_k
from retd.model.generation import generate
from retd.model.loss import sequence_loss
from retd.model.model import RET, config_for
from retd.model.neighbour_prefix import parse_args, prefixed_batch, run, text_loss
from retd.model.pointer import PointerRET

FIXTURE = Path(__file__).parents[1] / "data" / "embedded"

ids = st.lists(st.integers(1, 255), max_size=12).map(lambda x: np.array(x, np.uint16))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(ids, ids), min_size=1, max_size=6))
def test_prefixed_batch_scores_only_the_text_and_its_eos(
    rows: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    prefixes, texts = [p for p, _ in rows], [t for _, t in rows]
    inputs, targets = prefixed_batch(prefixes, texts, eos_id=0)
    assert targets.shape[1] == inputs.shape[1] + 1
    for r, (prefix, text) in enumerate(rows):
        start = len(prefix) + 1
        assert inputs[r, : start - 1].tolist() == prefix.tolist()
        assert inputs[r, start - 1] == 0  # the separator
        assert inputs[r, start : start + len(text)].tolist() == text.tolist()
        scored = targets[r] != IGNORE
        # row t predicts token t: the text's tokens and then EOS, nothing of the prefix
        assert targets[r][scored].tolist() == [*text.tolist(), 0]
        assert scored.nonzero().flatten().tolist() == list(range(start, start + len(text) + 1))


def test_nearest_never_picks_a_row_itself_and_agrees_in_bfloat16() -> None:
    bank = np.load(FIXTURE / "embeddings/train/shard-00000.npy")
    doubled = np.concatenate([bank[:5], bank[:5], bank[5:]])  # rows i and i + 5 are one text
    idx, sims = nearest(doubled, doubled, exclude_self=True)
    assert (idx != np.arange(len(doubled))).all()
    assert idx[:5].tolist() == list(range(5, 10)) and idx[5:10].tolist() == list(range(5))
    assert np.allclose(sims[:10], 1.0, atol=1e-3)
    fast, fast_sims = nearest(doubled, doubled, exclude_self=True, dtype=torch.bfloat16, chunk=7)
    assert np.abs(fast_sims - sims).max() < 0.02  # bfloat16 may pick a near tie, never a far row
    with pytest.raises(ValueError, match="exclude_self"):
        nearest(bank[:3], bank, exclude_self=True)


def _pointer_pair(seed: int = 0) -> tuple[RET, PointerRET]:
    """A tiny RET with tokens that count, and the same weights as a PointerRET."""
    torch.manual_seed(seed)
    plain = RET(config_for("ret_tiny")).eval()
    with torch.no_grad():
        plain.wte.weight.mul_(30)  # at init the embedding drowns the tokens: make them count
    return plain, PointerRET.of(plain)


def test_generation_after_a_prefix_is_the_greedy_path_given_it() -> None:
    model, _ = _pointer_pair()
    emb = torch.randn(3, 768)
    prefixes = [[5, 6, 7, 0], [0], [9, 0]]
    params = [SamplingParams(12)] * 3
    after = generate(model, emb, params, use_cache=False, prefixes=prefixes)
    with torch.no_grad():
        for r, prefix in enumerate(prefixes):
            tokens: list[int] = []
            for _ in range(len(after[r].token_ids)):
                logits = model(emb[r : r + 1], torch.tensor([prefix + tokens]))[0, -1]
                tokens.append(int(logits.argmax()))
            assert after[r].token_ids == tokens[: len(after[r].token_ids)]
    plain = generate(model, emb, params, use_cache=False)
    empty = generate(model, emb, params, use_cache=False, prefixes=[[]] * 3)
    assert [r.token_ids for r in empty] == [r.token_ids for r in plain]
    assert [r.token_ids for r in after] != [r.token_ids for r in plain]
    cached = generate(model, emb, params, prefixes=prefixes)  # prefilled through model.step
    assert [r.token_ids for r in cached] == [r.token_ids for r in after]
    with pytest.raises(ValueError, match="prefixes"):
        generate(model, emb, params, prefixes=prefixes[:2])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.one_of(st.just(None), ids), min_size=1, max_size=5), st.integers(0, 2**16))
def test_a_pointer_decodes_the_same_with_its_cache_as_without(
    drawn: list[np.ndarray | None], seed: int
) -> None:
    """Cached (prefix fed through PointerRET.step into a CopyCache) and uncached (the forward
    over prefix and text at every step) decoding agree: tokens and their log-probabilities,
    rows of different prefix lengths (and none) in one batch, sampled rows included."""
    _, pointer = _pointer_pair(seed % 5)
    prefixes = [[] if p is None else [*p.tolist(), 0] for p in drawn]
    emb = torch.randn(len(drawn), 768, generator=torch.Generator().manual_seed(seed))
    params = [
        SamplingParams(10, temperature=float(i % 2), seed=seed + i) for i in range(len(drawn))
    ]
    cached = generate(pointer, emb, params, prefixes=prefixes)
    uncached = generate(pointer, emb, params, use_cache=False, prefixes=prefixes)
    assert [r.token_ids for r in cached] == [r.token_ids for r in uncached]
    for a, b in zip(cached, uncached, strict=True):
        assert a.mean_logprob == pytest.approx(b.mean_logprob, abs=1e-4)


def test_a_short_run_measures_against_retrieval_and_resumes(tmp_path: Path) -> None:
    init = init_checkpoint(tmp_path / "init", architecture="ret_tiny")
    argv = [str(tmp_path / "run"), "--init", str(init), "--data-dir", str(FIXTURE),
            "--batch", "8", "--eval-every", "3", "--max-prefix", "16"]  # fmt: skip
    report = run(parse_args([*argv, "--max-steps", "4"]))
    assert report["step"] == 4 and report["chrf"] >= 0 and 0 < report["retrieval"]["chrf"] <= 100
    assert sum(band["texts"] for band in report["by_similarity"]) == 32  # every held-out text
    assert -1 <= report["cosine"] <= 1
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[-1] == report
    # the neighbours written beside it: the best by cosine among the other training texts
    with np.load(tmp_path / "run/neighbours.npz") as z:
        train = np.load(FIXTURE / "embeddings/train/shard-00000.npy").astype(np.float32)
        exact = nearest(train, train, exclude_self=True)[1]
        assert np.abs(z["train_sim"][:, 0] - exact).max() < 0.02
    again = run(parse_args([*argv, "--max-steps", "7"]))  # the same command goes on
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert again["step"] == 7 and log[-1] == again
    assert all(rec["step"] > 0 for rec in log[log.index(report) + 1 :])  # no fresh start
    # the trained weights as a checkpoint that loads, with how it was made on its card
    saved = load_checkpoint(tmp_path / "run/checkpoint")
    state = torch.load(tmp_path / "run/state.pt")["model"]
    assert all(torch.equal(saved.model.state_dict()[k], v) for k, v in state.items())
    training = saved.card["training"]
    assert saved.trained and training["steps"] == 7 and training["init_from"] == str(init)
    assert training["command"].endswith("--max-steps 7") and saved.version.endswith("prefix.7")
    assert training["heldout"]["chrf"] == again["chrf"]
    with pytest.raises(SystemExit):
        parse_args([*argv, "--neighbour-drop", "1.5"])
    # neighbours searched over other embeddings (the split grew since) are refused, not misread
    with np.load(tmp_path / "run/neighbours.npz") as z:
        cached = {k: z[k] for k in z.files}
    for changed in ({"digest": np.array("0" * 16)}, {"train_idx": cached["train_idx"][:-1]}):
        np.savez(tmp_path / "run/neighbours.npz", **{**cached, **changed})
        with pytest.raises(ValueError, match="remove it to search again"):
            run(parse_args([*argv, "--max-steps", "8"]))


def test_a_run_on_some_texts_trains_after_one_of_their_k_nearest(tmp_path: Path) -> None:
    init = init_checkpoint(tmp_path / "init", architecture="ret_tiny")
    argv = [str(tmp_path / "run"), "--init", str(init), "--data-dir", str(FIXTURE),
            "--batch", "4", "--eval-every", "50", "--max-prefix", "8",
            "--neighbours", "3", "--queries", "10"]  # fmt: skip
    report = run(parse_args([*argv, "--max-steps", "2"]))
    assert report["step"] == 2
    train = np.load(FIXTURE / "embeddings/train/shard-00000.npy").astype(np.float32)
    with np.load(tmp_path / "run/neighbours.npz") as z:
        rows, idx = z["train_rows"], z["train_idx"]
    assert len(rows) == 10 == len(set(rows.tolist())) and idx.shape == (10, 3)
    exact, _ = nearest_k(train[rows], train, 3, own=rows)
    assert (idx != rows[:, None]).all()  # never a text's own row
    assert (idx[:, 0] == exact[:, 0]).mean() >= 0.8  # bfloat16 products: near ties may swap
    card = load_checkpoint(tmp_path / "run/checkpoint").card["training"]
    assert (card["neighbours"], card["queries"]) == (3, 10)
    with pytest.raises(ValueError, match="not 2 of the 10 training"):  # the cache is of K = 3
        run(parse_args([*argv[:-4], "--neighbours", "2", "--queries", "10", "--max-steps", "3"]))
    for bad in (["--neighbours", "0"], ["--queries", "-1"]):
        with pytest.raises(SystemExit):
            parse_args([*argv, *bad])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(ids, ids), min_size=1, max_size=5), st.integers(0, 2**16))
def test_pointer_moves_mass_only_onto_prefix_tokens(
    rows: list[tuple[np.ndarray, np.ndarray]], seed: int
) -> None:
    plain, pointer = _pointer_pair(seed % 7)
    prefixes, texts = [p for p, _ in rows], [t for _, t in rows]
    inputs, targets = prefixed_batch(prefixes, texts, eos_id=0)
    emb = torch.randn(len(rows), 768, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        joint, alone = pointer(emb, inputs), plain(emb, inputs).log_softmax(-1)
        assert torch.allclose(joint.exp().sum(-1), torch.ones(joint.shape[:2]), atol=1e-4)
        scored = targets != IGNORE
        # `loss` (targets only) is the forward's distribution at the targets
        full = -joint[scored].gather(-1, targets[scored][:, None]).mean()
        assert torch.allclose(pointer.loss(emb, inputs, targets), full, atol=1e-4)
        for r, prefix in enumerate(prefixes):
            held = [*set(prefix.tolist()), 0]  # a prefix's tokens and its separator's EOS
            other = torch.ones(joint.shape[-1], dtype=torch.bool)
            other[held] = False
            text_rows = slice(len(prefix) + 1, len(prefix) + len(texts[r]) + 2)
            gained = joint[r, text_rows].exp() - alone[r, text_rows].exp()  # (rows, V)
            assert (gained[:, other] <= 1e-6).all()  # no token outside the prefix gains
            assert (gained[:, held].sum(-1) >= -1e-6).all()  # what they lose, the prefix gets
        # with no EOS in a row there is nothing to copy: RET's own distribution
        no_eos = inputs.clamp(min=1)
        assert torch.allclose(pointer(emb, no_eos), plain(emb, no_eos).log_softmax(-1), atol=1e-5)


def test_pointer_learns_to_copy_its_prefix_where_ret_cannot_yet() -> None:
    plain, pointer = _pointer_pair()
    rng = np.random.default_rng(0)
    losses = {}
    for name, model in (("ret", plain), ("pointer", pointer)):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(60):  # text = its prefix: random tokens, nothing to learn but copying
            prefixes = [rng.integers(1, 256, 10).astype(np.uint16) for _ in range(16)]
            inputs, targets = prefixed_batch(prefixes, prefixes, eos_id=0)
            loss = text_loss(model, torch.zeros(16, 768), inputs, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[name] = float(loss.detach())
    assert losses["pointer"] < 0.5 * losses["ret"], losses


def test_the_kept_pointer_checkpoint_copies_a_neighbour_that_is_the_text() -> None:
    """model/checkpoints/ret_v21_bpe1792_pointer (the 75-minute --pointer run): as PointerRET,
    given the text itself as the neighbour, it puts far more probability on the text than the
    same weights without the pointer, or the shipped model without a neighbour."""
    root = Path(__file__).parents[2] / "model" / "checkpoints"
    loaded = load_checkpoint(root / "ret_v21_bpe1792_pointer")
    shipped = load_checkpoint(root / "ret_v21_bpe1792").model.eval()
    assert loaded.model.num_parameters() == 722_944
    pointer = PointerRET.of(loaded.model).eval()
    head = load_split(Path(__file__).parents[1] / "data" / "heldout_head", "heldout")
    texts = encode_texts(head.texts[:32], 256, loaded.tokenizer)
    emb = torch.from_numpy(head.embeddings[:32].astype(np.float32))
    inputs, targets = prefixed_batch([t[:64] for t in texts], texts, eos_id=0)
    alone_inputs, alone_targets = prefixed_batch([t[:0] for t in texts], texts, eos_id=0)
    with torch.no_grad():
        copying = float(pointer.loss(emb, inputs, targets))
        reading = float(sequence_loss(loaded.model.eval(), emb, inputs, targets))
        shipped_alone = float(sequence_loss(shipped, emb, alone_inputs, alone_targets))
    assert copying < 0.5 * reading and copying < 0.5 * shipped_alone, (copying, reading)
