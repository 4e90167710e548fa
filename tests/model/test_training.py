"""Training and evaluation on a small fixture of real embeddings (tests/data/embedded)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retd.model.batches import bucketed_batches, drop_tokens, make_batch
from retd.model.checkpoint import load_checkpoint
from retd.model.embed import load_split
from retd.model.evaluate import (
    beam_search,
    evaluate_checkpoint,
    greedy_texts,
    heldout_rows,
    retrieval_baseline,
    text_scores,
)
from retd.model.generation import SamplingParams, generate
from retd.model.loss import heldout_losses, heldout_set
from retd.model.model import RET, config_for
from retd.model.train import TrainConfig, attention_kernel, lr_at, train

FIXTURE = Path(__file__).parents[1] / "data" / "embedded"


def fixture_config(tmp_path: Path, **overrides: object) -> TrainConfig:
    values: dict[str, object] = {
        "data_dir": str(FIXTURE),
        "out_dir": str(tmp_path / "run"),
        "batch_size": 32,
        "learning_rate": 3e-3,
        "warmup_steps": 5,
        "max_steps": 40,
        "eval_every": 20,
        "save_every": 10,
        "eval_texts": 16,
        "threads": 1,
        "version": "test",
        # RET v2.1's shape with room for the fixture's texts (at most 60 bytes): evaluations
        # of a barely trained model decode to max_length, 4x fewer steps than at 256
        "model": {"max_length": 64},
    }
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, Path]:
    """One run of the fixture's config (40 steps of RET v2.1's shape) and its exported
    checkpoint, for the tests that only read them (a test that writes copies first)."""
    config = fixture_config(tmp_path_factory.mktemp("trained"))
    return config, train(config, progress=False)


def losses(out_dir: Path) -> list[float]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def tiny_losses(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The step losses of one plain run of the fixture's config in ret_tiny's shape, which the
    tests of other step settings (bfloat16, dropout) are held against."""
    config = fixture_config(tmp_path_factory.mktemp("tiny"), architecture="ret_tiny")
    train(config, progress=False)
    return losses(Path(config.out_dir))


def test_training_lowers_the_loss_and_exports_a_loadable_checkpoint(
    trained: tuple[TrainConfig, Path],
) -> None:
    config, checkpoint = trained
    curve = losses(Path(config.out_dir))
    assert len(curve) == 40
    assert np.mean(curve[-5:]) < curve[0] - 1.0, curve  # from ~5.5 nats/byte (uniform)
    loaded = load_checkpoint(checkpoint, device="cpu")
    assert loaded.trained and loaded.card["training"]["steps"] == 40
    assert loaded.card["encoder"]["weights_sha256"].startswith("78c0197b")
    metrics = loaded.card["metrics"]
    assert metrics["step"] == 40
    # the exported weights are the trained ones: their held-out loss is the logged one
    true_loss = metrics["heldout_loss"]
    assert true_loss < 4.0 and metrics["heldout_loss_shuffled"] > 0
    emb = torch.from_numpy(np.load(FIXTURE / "embeddings/heldout/shard-00000.npy")[:1]).float()
    result = generate(loaded.model, emb, [SamplingParams(max_new_tokens=20)])[0]
    assert len(result.token_ids) >= 1


def test_resuming_gives_exactly_the_uninterrupted_run(tmp_path: Path) -> None:
    """Paused mid-epoch at step 10 and resumed to 20, the weights equal a straight run's
    (ret_tiny: what resuming restores does not depend on the shape)."""
    run: dict[str, object] = {"architecture": "ret_tiny", "embedding_noise": 0.01, "max_steps": 20}
    straight = fixture_config(tmp_path / "a", **run)
    train(straight, progress=False)
    paused = fixture_config(tmp_path / "b", stop_at_step=10, **run)
    train(paused, progress=False)
    assert len(losses(Path(paused.out_dir))) == 10
    resumed = fixture_config(tmp_path / "b", **run)
    train(resumed, resume=True, progress=False)
    assert losses(Path(resumed.out_dir)) == losses(Path(straight.out_dir))
    a = torch.load(Path(straight.out_dir) / "state.pt", weights_only=False)["model"]
    b = torch.load(Path(resumed.out_dir) / "state.pt", weights_only=False)["model"]
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


@pytest.mark.slow
def test_a_warm_start_begins_from_the_given_weights_and_keeps_their_record(
    tmp_path: Path, trained: tuple[TrainConfig, Path]
) -> None:
    _, first = trained
    cold = fixture_config(tmp_path / "cold", max_steps=5, eval_every=5)
    warm = fixture_config(tmp_path / "warm", max_steps=5, eval_every=5, init_from=str(first))
    train(cold, progress=False)
    checkpoint = train(warm, progress=False)
    # The warm run's first loss is where the first run ended, far below a cold start's.
    assert losses(Path(warm.out_dir))[0] < losses(Path(cold.out_dir))[0] - 1.0
    card = load_checkpoint(checkpoint, device="cpu").card
    assert card["training"]["init_from"]["training"]["steps"] == 40
    assert card["training"]["init_from"]["weights_sha256"] == load_checkpoint(first).sha256
    wrong = fixture_config(tmp_path / "wrong", architecture="ret_tiny", init_from=str(first))
    with pytest.raises(ValueError, match="init_from: .* holds a 'ret_v21' model"):
        train(wrong, progress=False)


def test_bfloat16_autocast_trains_as_float32_does(tmp_path: Path, tiny_losses: list[float]) -> None:
    """The same run with the step's matrix products in bfloat16: the same fall of the loss
    (what the real-data comparison in BENCHMARKS.md found too), float32 weights exported."""
    # ret_tiny: bfloat16 is emulated, and slow, on a CPU without AVX512-BF16 (CI's may be one)
    fast = fixture_config(tmp_path / "bf16", architecture="ret_tiny", autocast="bfloat16")
    checkpoint = train(fast, progress=False)
    a, b = tiny_losses, losses(Path(fast.out_dir))
    assert np.mean(b[-5:]) < b[0] - 1.0, b
    assert abs(np.mean(a[-5:]) - np.mean(b[-5:])) < 0.1, (a[-5:], b[-5:])
    assert a != b  # it did run in bfloat16
    loaded = load_checkpoint(checkpoint, device="cpu")
    assert next(loaded.model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="autocast: expected 'none' or 'bfloat16'"):
        train(fixture_config(tmp_path / "bad", autocast="float8"), progress=False)


@pytest.mark.parametrize("setting", ["dropout", "token_dropout"])
def test_dropout_trains_and_the_card_records_it(
    tmp_path: Path, tiny_losses: list[float], setting: str
) -> None:
    """A run with dropout (of the blocks, or of input tokens): the loss still falls, the steps
    differ from the same run without it, the card records the rate, and the exported model
    decodes deterministically (eval mode). A rate of 1 or more is refused."""
    dropped = fixture_config(tmp_path / "dropped", architecture="ret_tiny", **{setting: 0.2})
    checkpoint = train(dropped, progress=False)
    a, b = tiny_losses, losses(Path(dropped.out_dir))
    assert np.mean(b[-5:]) < b[0] - 1.0, b
    assert a[0] != b[0] and a != b
    card = json.loads((checkpoint / "card.json").read_text())
    assert card["training"]["config"][setting] == 0.2
    loaded = load_checkpoint(checkpoint, device="cpu").model
    emb, tokens = torch.randn(2, 768), torch.randint(1, 256, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(emb, tokens), loaded(emb, tokens))
    with pytest.raises(ValueError, match=rf"{setting}: expected a number in \[0, 1\), got 1.0"):
        train(fixture_config(tmp_path / "bad", **{setting: 1.0}), progress=False)


@settings(max_examples=30, deadline=None)
@given(
    p=st.floats(0.0, 0.9),
    shape=st.tuples(st.integers(1, 64), st.integers(1, 64)),
    seed=st.integers(0, 2**32 - 1),
)
def test_token_dropout_replaces_a_share_p_of_the_inputs_and_nothing_else(
    p: float, shape: tuple[int, int], seed: int
) -> None:
    inputs = torch.randint(1, 1792, shape)
    out = drop_tokens(inputs, p, 0, torch.Generator().manual_seed(seed))
    again = drop_tokens(inputs, p, 0, torch.Generator().manual_seed(seed))
    assert torch.equal(out, again)  # the generator decides
    replaced = out != inputs
    assert bool((out[replaced] == 0).all())  # a token is kept or becomes the given one
    n = inputs.numel()
    assert abs(int(replaced.sum()) - p * n) <= 5 * (n * p * (1 - p)) ** 0.5 + 1  # binomial
    if p == 0:
        assert out is inputs


def test_unknown_training_setting_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text("learning_rat = 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        TrainConfig.from_toml(path)


@given(
    step=st.integers(0, 10_000),
    warmup=st.integers(1, 500),
    total=st.integers(501, 10_000),
)
def test_learning_rate_warms_up_then_decays_within_bounds(
    step: int, warmup: int, total: int
) -> None:
    config = TrainConfig(learning_rate=1e-3, warmup_steps=warmup, max_steps=total, min_lr_ratio=0.1)
    lr, following = lr_at(step, config), lr_at(step + 1, config)
    assert 0 < lr <= 1e-3 + 1e-12
    if step + 1 < warmup:
        assert following > lr
    elif step >= warmup:
        assert 1e-4 - 1e-12 <= following <= lr + 1e-12


@given(
    lengths=st.lists(st.integers(1, 200), min_size=1, max_size=500),
    batch=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
    max_tokens=st.sampled_from([0, 1, 150, 1000, 5000]),
)
def test_an_epoch_of_batches_covers_every_text_once(
    lengths: list[int], batch: int, seed: int, max_tokens: int
) -> None:
    sizes = np.array(lengths)
    rows = list(bucketed_batches(sizes, batch, np.random.default_rng(seed), max_tokens))
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(lengths)))
    assert all(1 <= len(r) <= batch for r in rows)
    if max_tokens:  # only a text alone may pass the cap
        assert all(len(r) == 1 or len(r) * (sizes[r].max() + 1) <= max_tokens for r in rows)
    else:  # no cap: every batch but each chunk's last is full
        assert sum(len(r) < batch for r in rows) <= -(-len(lengths) // (batch * 64))


@given(
    texts=st.lists(st.binary(min_size=1, max_size=30), min_size=1, max_size=8),
    data=st.data(),
    eos=st.integers(0, 255),
)
def test_a_batch_teaches_each_byte_then_eos_and_ignores_padding(
    texts: list[bytes], data: st.DataObject, eos: int
) -> None:
    encoded = [np.frombuffer(t, np.uint8).astype(np.uint16) for t in texts]
    rows = np.array(data.draw(st.lists(st.integers(0, len(texts) - 1), min_size=1, max_size=8)))
    inputs, targets = make_batch(encoded, rows, eos_id=eos)
    longest = max(len(texts[i]) for i in rows)
    assert inputs.shape == (len(rows), longest) and targets.shape == (len(rows), longest + 1)
    for b, i in enumerate(rows):
        text = texts[i]
        assert inputs[b, : len(text)].tolist() == list(text)
        assert (inputs[b, len(text) :] == 0).all()
        assert targets[b, : len(text)].tolist() == list(text)
        assert targets[b, len(text)] == eos
        assert (targets[b, len(text) + 1 :] == -100).all()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000))
def test_beam_search_of_width_one_is_greedy(seed: int) -> None:
    model = RET(config_for("ret_tiny")).eval()
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # a sharper model, so that sequences end at EOS as well as at length
        model.wte.weight.mul_(25)
    emb = torch.randn(5, 768, generator=torch.Generator().manual_seed(seed))
    greedy = generate(model, emb, [SamplingParams(max_new_tokens=40)] * 5)
    beams = beam_search(model, emb, num_beams=1, max_new_tokens=40)
    for g, b in zip(greedy, beams, strict=True):
        expected = g.token_ids[:-1] if g.finish_reason == "eos" else g.token_ids
        assert b == expected


def test_wider_beams_find_sequences_at_least_as_likely_when_unnormalised() -> None:
    """With no length normalisation, beam search's best finished score never falls below the
    greedy path's total log-probability (the greedy path is one of the hypotheses it keeps)."""
    model = RET(config_for("ret_tiny")).eval()
    model.init_weights(generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.wte.weight.mul_(25)
    emb = torch.randn(4, 768, generator=torch.Generator().manual_seed(3))

    def total_logprob(row: int, seq: list[int]) -> float:
        tokens = torch.tensor([seq + [0]])
        logits = model(emb[row : row + 1], tokens[:, :-1])[0]
        return float(torch.log_softmax(logits, -1).gather(1, tokens[0][:, None]).sum())

    with torch.no_grad():
        greedy = beam_search(model, emb, num_beams=1, max_new_tokens=30, length_penalty=0.0)
        wide = beam_search(model, emb, num_beams=4, max_new_tokens=30, length_penalty=0.0)
        for row in range(4):
            assert total_logprob(row, wide[row]) >= total_logprob(row, greedy[row]) - 1e-4


def test_scores_of_perfect_and_empty_decoding() -> None:
    refs = ["A plant that is small.", "That which has mass."]
    perfect = text_scores(refs, refs)
    assert perfect["chrf"] == pytest.approx(100) and perfect["exact_match"] == 100
    empty = text_scores(["", ""], refs)
    assert empty["chrf"] == 0 and empty["exact_match"] == 0


def test_heldout_losses_score_in_eval_mode_and_leave_the_mode_as_it_was() -> None:
    model = RET(config_for("ret_tiny"))
    model.set_dropout(0.5)  # a train-mode pass would drop, and differ from call to call
    _, embeddings, encoded = heldout_set(load_split(FIXTURE, "heldout"), 16, 64)
    model.eval()
    scored = heldout_losses(model, embeddings, encoded)
    assert not model.training
    model.train()
    assert heldout_losses(model, embeddings, encoded) == scored
    assert model.training


def test_retrieval_baseline_finds_bank_members() -> None:
    bank = np.load(FIXTURE / "embeddings/train/shard-00000.npy")
    texts = (FIXTURE / "corpus/train.txt").read_text().splitlines()
    found, sims = retrieval_baseline(bank[:10], bank, texts)
    assert found == texts[:10]
    assert (sims > 0.99).all()


def test_eval_scores_a_checkpoint_and_writes_its_card(
    tmp_path: Path, trained: tuple[TrainConfig, Path]
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(trained[1], copy)
    head = tmp_path / "head"
    report = evaluate_checkpoint(
        copy, FIXTURE, limit=8, num_beams=(2,), use_encoder=False, head=head
    )
    assert report["heldout_texts"] == 8
    for mode in ("greedy", "beam2", "retrieval"):
        assert 0 <= report[mode]["chrf"] <= 100, mode
    assert report["retrieval"]["bank_texts"] == 192
    assert 0 < report["byte_accuracy"] <= 100
    card = json.loads((copy / "card.json").read_text())
    assert card["metrics"]["eval"]["greedy"] == report["greedy"]
    assert (
        load_checkpoint(copy, device="cpu").sha256
        == load_checkpoint(trained[1], device="cpu").sha256
    )
    # the greedy figures are those of the server's Decode path
    loaded = load_checkpoint(copy, device="cpu")
    lines = (FIXTURE / "corpus/heldout.txt").read_text().splitlines()
    rows = heldout_rows(len(lines), 8)
    assert len(rows) == 8 and rows[0] == 0 and rows[-1] == len(lines) - 1
    emb = torch.from_numpy(np.load(FIXTURE / "embeddings/heldout/shard-00000.npy")[rows]).float()
    texts = [lines[i] for i in rows]
    decoded = greedy_texts(loaded.model, emb, max_new_tokens=loaded.model.config.max_length - 1)
    assert report["greedy"]["chrf"] == pytest.approx(text_scores(decoded, texts)["chrf"], abs=0.01)
    # the head written beside the card holds the scored texts, and reproduces its examples
    written = load_split(head, "heldout")
    assert written.texts == texts
    np.testing.assert_array_equal(written.embeddings, emb.numpy().astype(np.float16))
    examples = card["metrics"]["eval"]["examples"]
    assert [e["reference"] for e in examples] == written.texts[: len(examples)]
    assert [e["greedy"] for e in examples] == decoded[: len(examples)]


def test_training_takes_in_shards_embedded_since_it_started(tmp_path: Path) -> None:
    """`retd train` may start while `retd embed` runs: a shard completed later joins at the
    next epoch (here: at the resume), and the run goes on from where it was."""
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)
    texts = (data / "corpus/train.txt").read_text().splitlines()
    embeddings = np.load(data / "embeddings/train/shard-00000.npy")
    (data / "embeddings/embeddings.json").write_text('{"shard_size": 96}')
    np.save(data / "embeddings/train/shard-00000.npy", embeddings[:96])
    config = fixture_config(tmp_path, data_dir=str(data), max_steps=8, stop_at_step=4)
    train(config, progress=False)
    state = torch.load(Path(config.out_dir) / "state.pt", weights_only=False)
    assert (state["texts"], state["step"]) == (96, 4)
    np.save(data / "embeddings/train/shard-00001.npy", embeddings[96:])
    train(dataclasses.replace(config, stop_at_step=0), resume=True, progress=False)
    state = torch.load(Path(config.out_dir) / "state.pt", weights_only=False)
    assert (state["texts"], state["step"]) == (len(texts), 8)
    assert len(losses(Path(config.out_dir))) == 8


@given(minutes=st.floats(0, 200), step=st.integers(500, 10_000))
def test_with_a_time_budget_the_learning_rate_decays_over_the_minutes(
    minutes: float, step: int
) -> None:
    budget = TrainConfig(learning_rate=1e-3, warmup_steps=100, max_steps=10**9, max_minutes=60)
    lr = lr_at(step, budget, minutes)
    if minutes >= 60:
        assert lr == pytest.approx(1e-3 * budget.min_lr_ratio)
    else:  # it follows the clock, not the (far away) step budget
        assert lr <= lr_at(step, budget, 0.0) + 1e-12
        assert lr >= lr_at(step, budget, min(60.0, minutes + 1)) - 1e-12


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), ngram=st.integers(2, 6))
def test_no_repeat_decoding_holds_no_ngram_twice_and_is_greedy_until_a_repeat(
    seed: int, ngram: int
) -> None:
    model = RET(config_for("ret_tiny")).eval()
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.wte.weight.mul_(25)
    emb = torch.randn(4, 768, generator=torch.Generator().manual_seed(seed))
    greedy = generate(model, emb, [SamplingParams(max_new_tokens=40)] * 4)
    blocked = generate(model, emb, [SamplingParams(40, no_repeat_ngram_size=ngram)] * 4)
    for g, b in zip(greedy, blocked, strict=True):
        seq = b.token_ids[:-1] if b.finish_reason == "eos" else b.token_ids
        grams = [tuple(seq[i : i + ngram]) for i in range(len(seq) - ngram + 1)]
        assert len(grams) == len(set(grams))
        plain = g.token_ids[:-1] if g.finish_reason == "eos" else g.token_ids
        plain_grams = [tuple(plain[i : i + ngram]) for i in range(len(plain) - ngram + 1)]
        if len(plain_grams) == len(set(plain_grams)):  # greedy repeated nothing: same output
            assert seq == plain


@pytest.mark.slow
def test_eval_reports_each_source_and_the_ood_split_beside_retrieval(
    tmp_path: Path, trained: tuple[TrainConfig, Path]
) -> None:
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(trained[1], checkpoint)
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)
    heldout = (data / "corpus/heldout.txt").read_text().splitlines()
    labels = ["wiki" if i % 2 else "chat" for i in range(len(heldout))]
    (data / "corpus/heldout.sources.txt").write_text("".join(x + "\n" for x in labels))
    (data / "corpus/ood.txt").write_text("".join(t + "\n" for t in heldout[:4]))
    (data / "corpus/ood.sources.txt").write_text("docs\n" * 4)
    (data / "embeddings/ood").mkdir()
    vectors = np.load(data / "embeddings/heldout/shard-00000.npy")[:4]
    np.save(data / "embeddings/ood/shard-00000.npy", vectors)
    report = evaluate_checkpoint(
        checkpoint, data, limit=4, num_beams=(), use_encoder=False, write_card=False, per_source=3
    )
    assert set(report["per_source"]["heldout"]) == {"wiki", "chat"}
    assert set(report["per_source"]["ood"]) == {"docs"}
    for figures in [*report["per_source"]["heldout"].values(), report["per_source"]["ood"]["docs"]]:
        assert figures["texts"] == 3
        for decoder in ("greedy", "decode_default", "retrieval"):
            assert 0 <= figures[decoder]["chrf"] <= 100


def test_a_model_table_trains_another_shape_and_the_card_records_it(tmp_path: Path) -> None:
    shape = {"n_layer": 2, "conditioning": "layer"}
    config = fixture_config(tmp_path, architecture="ret_tiny", model=shape, max_steps=10)
    loaded = load_checkpoint(train(config, progress=False), device="cpu")
    assert loaded.config.n_layer == 2 and loaded.config.conditioning == "layer"
    assert loaded.card["config"]["n_layer"] == 2
    assert loaded.card["training"]["config"]["model"] == shape


@pytest.mark.slow
def test_a_compiled_training_step_trains_as_the_eager_one(tmp_path: Path) -> None:
    # ret_tiny: one block compiles in a third of the time three take (cold: 52 s in CI)
    tiny = dict(architecture="ret_tiny", max_steps=6, eval_every=6, model={})
    eager = fixture_config(tmp_path / "a", **tiny)
    compiled = fixture_config(tmp_path / "b", compile=True, **tiny)
    train(eager, progress=False)
    train(compiled, progress=False)
    np.testing.assert_allclose(
        losses(Path(compiled.out_dir)), losses(Path(eager.out_dir)), rtol=2e-3
    )


@pytest.mark.slow
def test_keep_best_exports_the_evaluation_with_the_lowest_held_out_loss(
    tmp_path: Path, trained: tuple[TrainConfig, Path]
) -> None:
    """A warm start whose learning rate climbs until it makes the model worse: with keep_best
    the exported checkpoint is the best evaluation's, not the last step's."""
    _, first = trained
    run = fixture_config(
        tmp_path / "hot", init_from=str(first), learning_rate=0.02, warmup_steps=12,
        max_steps=12, eval_every=3, keep_best=True,
    )  # fmt: skip
    checkpoint = train(run, progress=False)
    logged = [
        json.loads(line)
        for line in (Path(run.out_dir) / "metrics.jsonl").read_text().splitlines()
        if "heldout_loss" in line
    ]
    best = min(logged, key=lambda r: r["heldout_loss"])
    assert best["step"] < 12  # it did get worse, so the last step is not the best
    card = load_checkpoint(checkpoint).card
    assert (card["metrics"]["step"], card["metrics"]["heldout_loss"]) == (
        best["step"],
        best["heldout_loss"],
    )


def kernels_of_a_step(choice: str, device: str) -> set[str]:
    """The ATen attention kernels a training step of RET v2.1 ran (forward and backward)."""
    from torch.profiler import ProfilerActivity, profile

    model = RET(config_for("ret_v21", {"max_length": 64}))
    embeddings = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    inputs, targets = make_batch([np.arange(1, 20, dtype=np.uint16)] * 4, np.arange(4), 0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with attention_kernel(choice, torch.device(device)):
            logits = model(embeddings, inputs)
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=-100
            )
        loss.backward()
    return {e.key for e in prof.key_averages() if "attention" in e.key or e.key == "aten::bmm"}


def test_the_training_step_runs_attention_on_the_chosen_kernel(tmp_path: Path) -> None:
    """On a CPU, "auto" and "math" run attention as matrix products (no flash kernel, whose
    backward was 44% of a step); "default" leaves PyTorch's flash kernel; a GPU's "auto" is
    PyTorch's choice. An unknown name is refused."""
    for choice in ("auto", "math"):
        ran = kernels_of_a_step(choice, "cpu")
        assert "aten::bmm" in ran and not any("flash" in k for k in ran), ran
    assert any("flash" in k for k in kernels_of_a_step("default", "cpu"))
    assert isinstance(attention_kernel("auto", torch.device("cuda")), contextlib.nullcontext)
    with pytest.raises(ValueError, match="attention: expected one of auto, math, default"):
        train(fixture_config(tmp_path, attention="flash"), progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="here a CUDA run would train")
def test_a_cuda_run_without_a_cuda_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device: 'cuda' but torch sees no CUDA device"):
        train(fixture_config(tmp_path, device="cuda"), progress=False)


ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "model" / "configs").rglob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_training_config_reads_and_its_shape_is_722944_parameters(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configs `retd train` and `make gpu-train` run: every setting known, and the shape
    each trains (its [model] over its init_from checkpoint's shape) exactly RET v2.1's
    parameter count, at its tokenizer's vocabulary (one `make gpu-train` learns on the device
    is named for its size: bpe1792.json)."""
    import re

    from retd.model.run_setup import _init_shape, resolve_tokenizer

    monkeypatch.chdir(ROOT)  # the configs name paths from the repository root
    config = TrainConfig.from_toml(path)
    made_earlier = config.init_from.startswith("build/")  # a run of a past session: gone
    shape = {**({} if made_earlier else _init_shape(config)), **config.model}
    learnt_there = re.fullmatch(r"build/gpu-data/bpe(\d+)\.json", config.tokenizer)
    if learnt_there:
        shape["vocab_size"] = int(learnt_there.group(1))
    else:
        shape["vocab_size"] = resolve_tokenizer(config).vocab_size
    assert RET(config_for(config.architecture, shape)).num_parameters() == 722_944, shape


def test_a_config_over_its_base_replaces_whole_keys_and_refuses_a_cycle(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.toml").write_text(
        'learning_rate = 4e-3\nseed = 9\nout_dir = "root"\n[model]\nn_layer = 3\nmlp_hidden = 256\n'
    )
    (tmp_path / "sub/mid.toml").write_text('base = "../root.toml"\nseed = 1\n')
    (tmp_path / "sub/leaf.toml").write_text(
        'base = "mid.toml"\nout_dir = "leaf"\n[model]\nn_layer = 5\n'
    )
    leaf = TrainConfig.from_toml(tmp_path / "sub/leaf.toml", {"seed": 2})
    # the nearest file wins; a table is replaced whole (mlp_hidden is not inherited)
    assert (leaf.learning_rate, leaf.out_dir, leaf.model) == (4e-3, "leaf", {"n_layer": 5})
    assert leaf.seed == 2 and TrainConfig.from_toml(tmp_path / "sub/mid.toml").seed == 1
    (tmp_path / "root.toml").write_text('base = "sub/leaf.toml"\n')
    with pytest.raises(ValueError, match="`base` files name each other"):
        TrainConfig.from_toml(tmp_path / "sub/leaf.toml")
    (tmp_path / "bad.toml").write_text("base = 3\n")
    with pytest.raises(ValueError, match="base in .*bad.toml must be a path"):
        TrainConfig.from_toml(tmp_path / "bad.toml")
