"""Sampling and batched generation: cache vs reference, batching independence, stops, seeds."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retd.model.generation import (
    FinishReason,
    NGramBlocker,
    RepetitionTracker,
    SamplingParams,
    generate,
)
from retd.model.model import RET
from retd.model.sampling import apply_repetition_penalty, sample

RiggedModel = tuple[RET, torch.Tensor, torch.Tensor]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_with_and_without_cache_agree(make_model: Callable[..., RET], seed: int) -> None:
    model = make_model("ret_tiny", seed=seed)
    emb = torch.randn(4, 768)
    params = [SamplingParams(max_new_tokens=n) for n in (64, 40, 17, 1)]
    cached = generate(model, emb, params, use_cache=True)
    reference = generate(model, emb, params, use_cache=False)
    assert [r.token_ids for r in cached] == [r.token_ids for r in reference]
    assert [r.finish_reason for r in cached] == [r.finish_reason for r in reference]
    for c, r in zip(cached, reference, strict=True):
        assert c.mean_logprob == pytest.approx(r.mean_logprob, abs=1e-5)
    assert len(cached[0].token_ids) > 1  # a real multi-step comparison


def test_greedy_with_and_without_cache_agree_on_ret_v21(make_model: Callable[..., RET]) -> None:
    model = make_model("ret_v21", seed=0)
    emb = torch.randn(2, 768)
    params = [SamplingParams(max_new_tokens=24)] * 2
    cached = generate(model, emb, params)
    reference = generate(model, emb, params, use_cache=False)
    assert [r.token_ids for r in cached] == [r.token_ids for r in reference]


def test_greedy_batched_equals_alone(tiny_model: RET) -> None:
    emb = torch.randn(5, 768)
    params = [SamplingParams(max_new_tokens=n) for n in (30, 64, 5, 50, 64)]
    batched = generate(tiny_model, emb, params)
    for i in range(5):
        (alone,) = generate(tiny_model, emb[i : i + 1], [params[i]])
        assert alone.token_ids == batched[i].token_ids
        assert (alone.text, alone.finish_reason) == (batched[i].text, batched[i].finish_reason)
        assert alone.mean_logprob == pytest.approx(batched[i].mean_logprob, abs=1e-5)


def _sampled(seed: int | None, n: int = 40) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=1.0, top_k=50, top_p=0.95, seed=seed)


def test_seeded_sampling_is_reproducible(tiny_model: RET) -> None:
    emb = torch.randn(1, 768)
    first = generate(tiny_model, emb, [_sampled(7)])
    assert generate(tiny_model, emb, [_sampled(7)]) == first
    assert generate(tiny_model, emb, [_sampled(8)]) != first


def test_seeded_sampling_is_independent_of_batch_mates(tiny_model: RET) -> None:
    emb = torch.randn(4, 768)
    (alone,) = generate(tiny_model, emb[1:2], [_sampled(7)])
    for mates in ([_sampled(1), _sampled(2), _sampled(3)], [SamplingParams(5), _sampled(None)] * 2):
        params = [mates[0], _sampled(7), mates[1], mates[2]]
        for use_cache in (True, False):
            batch = generate(tiny_model, emb, params, use_cache=use_cache)
            assert batch[1].token_ids == alone.token_ids


def test_rigged_model_emits_eos_or_a(rigged: RiggedModel) -> None:
    model, eos_emb, a_emb = rigged
    out = generate(model, torch.stack([eos_emb, a_emb]), [SamplingParams(6)] * 2)
    assert out[0].token_ids == [0] and out[0].finish_reason is FinishReason.EOS
    assert out[0].text == ""
    assert out[1].text == "AAAAAA" and out[1].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("use_cache", [True, False])
def test_each_row_stops_on_its_own(rigged: RiggedModel, use_cache: bool) -> None:
    model, eos_emb, a_emb = rigged
    emb = torch.stack([a_emb, eos_emb, a_emb, a_emb, a_emb])
    params = [
        SamplingParams(max_new_tokens=5),
        SamplingParams(max_new_tokens=64),
        SamplingParams(max_new_tokens=64, stop=("AAA",)),
        SamplingParams(max_new_tokens=64, stop=("xyz", "AA")),
        SamplingParams(max_new_tokens=9, stop=("B",)),
    ]
    sizes: list[int] = []
    original = model.step if use_cache else model.forward

    def spy(embedding_or_cond: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        sizes.append(embedding_or_cond.shape[0])
        return original(embedding_or_cond, *args, **kwargs)

    setattr(model, "step" if use_cache else "forward", spy)
    out = generate(model, emb, params, use_cache=use_cache)
    assert [(r.text, r.finish_reason, len(r.token_ids)) for r in out] == [
        ("AAAAA", FinishReason.LENGTH, 5),
        ("", FinishReason.EOS, 1),
        ("", FinishReason.STOP, 3),
        ("", FinishReason.STOP, 2),
        ("AAAAAAAAA", FinishReason.LENGTH, 9),
    ]
    assert out[2].token_ids == [65, 65, 65]
    # finished rows drop out: 5 rows, then 4 after the EOS, 3 after "AA", 2 after "AAA", ...
    assert sizes == [5, 4, 3, 2, 2, 1, 1, 1, 1]


def test_mean_logprob_is_a_mean_of_log_probabilities(rigged: RiggedModel) -> None:
    model, _, a_emb = rigged
    (out,) = generate(model, a_emb[None], [SamplingParams(4)])
    assert -1e-3 < out.mean_logprob <= 0.0  # the rigged model is certain


def test_generate_rejects_bad_requests(tiny_model: RET) -> None:
    with pytest.raises(ValueError, match="max_length"):
        generate(tiny_model, torch.randn(1, 768), [SamplingParams(65)])
    with pytest.raises(ValueError, match="2 embeddings"):
        generate(tiny_model, torch.randn(2, 768), [SamplingParams(3)])


def test_generate_runs_in_bfloat16(make_model: Callable[..., RET]) -> None:
    model = make_model("ret_tiny").to(torch.bfloat16)
    out = generate(model, torch.randn(2, 768), [SamplingParams(8), _sampled(3, 8)])
    assert all(1 <= len(r.token_ids) <= 8 for r in out)


# --- sample() --------------------------------------------------------------------------------


def test_sample_greedy_rows_take_the_argmax_and_report_logprobs() -> None:
    logits = torch.randn(3, 256)
    tokens, logprobs = sample(logits, [SamplingParams(1)] * 3)
    assert torch.equal(tokens, logits.argmax(-1))
    assert tokens.dtype == torch.long and logprobs.dtype == torch.float32
    expected = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs, expected)


def test_sample_logprob_ignores_temperature_and_filters() -> None:
    logits = torch.randn(1, 256)
    params = [SamplingParams(1, temperature=0.3, top_k=5, top_p=0.5, seed=0)]
    tokens, logprobs = sample(logits, params)
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[0, tokens])


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(2, 256)
    params = [
        SamplingParams(1, temperature=5.0, top_k=1, seed=1),
        SamplingParams(1, temperature=5.0, top_p=1e-6, seed=2),
    ]
    for step in range(20):
        tokens, _ = sample(logits, params, step)
        assert torch.equal(tokens, logits.argmax(-1))


def test_filters_keep_only_the_allowed_tokens() -> None:
    logits = torch.linspace(0, 3, 256)[None]  # token 255 most likely
    probs = logits.softmax(-1)[0]
    nucleus = int((probs.sort(descending=True).values.cumsum(0) < 0.5).sum()) + 1
    top_k, top_p = [], []
    for step in range(200):
        top_k.append(sample(logits, [SamplingParams(1, 1.0, top_k=3, seed=0)], step)[0].item())
        top_p.append(sample(logits, [SamplingParams(1, 1.0, top_p=0.5, seed=0)], step)[0].item())
    assert set(top_k) == {253, 254, 255}
    assert set(top_p) <= set(range(256 - nucleus, 256)) and len(set(top_p)) > 3


def test_sample_rows_draw_with_their_own_seeds() -> None:
    logits = torch.zeros(3, 256)
    p5, p6 = SamplingParams(1, temperature=1.0, seed=5), SamplingParams(1, temperature=1.0, seed=6)
    tokens, _ = sample(logits, [p5, p6, p5], 3)
    assert tokens[0] == tokens[2]
    first, _ = sample(logits[:1], [p5], 3)
    assert first[0] == tokens[0]
    # the draw counter moves a row along its stream: 20 steps of a uniform row are not all one
    assert len({sample(logits[:1], [p5], step)[0].item() for step in range(20)}) > 10


# --- SamplingParams --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -3}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"stop": "END"}, "stop"),
        ({"stop": ("",)}, "stop"),
        ({"stop": (3,)}, "stop"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"no_repeat_ngram_size": 2.0}, "no_repeat_ngram_size"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"repetition_penalty": True}, "repetition_penalty"),
        ({"repetition_ngram_size": 0}, "repetition_ngram_size"),
    ],
)
def test_sampling_params_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{"max_new_tokens": 4, **kwargs})


def test_sampling_params_defaults() -> None:
    params = SamplingParams(4, stop=["a", "b"])  # type: ignore[arg-type]
    assert params.greedy and params.stop == ("a", "b")
    assert not SamplingParams(4, temperature=0.7).greedy
    assert FinishReason.EOS == "eos"


def test_ngram_blocker_bans_what_followed_the_last_n_minus_1_bytes() -> None:
    blocker = NGramBlocker(3)
    for token in b"abcab":
        blocker.push(token)
    assert blocker.banned() == {ord("c")}  # "abc" exists: after "ab" no "c"
    blocker.push(ord("d"))
    assert blocker.banned() == set()  # "bd" was never followed
    unigram = NGramBlocker(1)
    for token in b"aab":
        unigram.push(token)
    assert unigram.banned() == {ord("a"), ord("b")}
    with pytest.raises(ValueError, match="n must be >= 1"):
        NGramBlocker(0)


def test_sample_never_picks_a_banned_token_and_reports_the_unfiltered_logprob() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.0]])
    params = [SamplingParams(4), SamplingParams(4)]
    tokens, logprobs = sample(logits, params, banned=[{1}, ()])
    assert tokens.tolist() == [2, 0]
    assert logprobs[0].item() == pytest.approx(torch.log_softmax(logits[0], -1)[2].item())


def _repeats(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 10_000),
    sizes=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    temperature=st.sampled_from([0.0, 0.8]),
)
def test_no_repeat_rows_hold_no_ngram_twice_with_or_without_cache(
    make_model: Callable[..., RET], seed: int, sizes: list[int], temperature: float
) -> None:
    model = make_model(seed=seed % 7)
    emb = torch.randn(len(sizes), 768, generator=torch.Generator().manual_seed(seed))
    params = [
        SamplingParams(48, temperature=temperature, seed=seed + i, no_repeat_ngram_size=n)
        for i, n in enumerate(sizes)
    ]
    cached = generate(model, emb, params)
    uncached = generate(model, emb, params, use_cache=False)
    assert [r.token_ids for r in uncached] == [r.token_ids for r in cached]
    for result, n in zip(cached, sizes, strict=True):
        body = result.token_ids[:-1] if result.finish_reason == "eos" else result.token_ids
        if n:
            assert not _repeats(body, n), (n, body)


# --- repetition_penalty ------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    repeated = torch.tensor([[True, True, False], [True, True, False]])
    params = [SamplingParams(4, repetition_penalty=2.0), SamplingParams(4)]
    out = apply_repetition_penalty(logits, params, repeated)
    assert out.tolist() == [[1.0, -4.0, 1.0], [2.0, -2.0, 1.0]]  # row 1's penalty is off
    tokens, logprobs = sample(logits, params, repeated=repeated)
    assert tokens.tolist() == [0, 0]  # 1.0 vs 1.0: argmax takes the first
    assert logprobs[0].item() == pytest.approx(torch.log_softmax(logits[0], -1)[0].item())
    tokens, _ = sample(logits, [SamplingParams(4, repetition_penalty=2.5)] * 2, repeated=repeated)
    assert tokens.tolist() == [2, 2]


def test_repetition_tracker_marks_bytes_or_ngram_followers() -> None:
    tracker = RepetitionTracker(2, 256)
    tracker.reset(0, SamplingParams(8, repetition_penalty=1.5))
    tracker.reset(1, SamplingParams(8, repetition_penalty=1.5, repetition_ngram_size=3))
    for a, b in zip(b"abcab", b"abcab", strict=True):
        tracker.push([0, 1], [a, b])
    mask = tracker.repeated([0, 1])
    assert set(mask[0].nonzero()[:, 0].tolist()) == set(b"abc")  # every byte generated
    assert mask[1].nonzero()[:, 0].tolist() == [ord("c")]  # "ab" was followed by "c"
    tracker.reset(0, SamplingParams(8))
    assert not tracker.repeated([0]).any()


def test_a_reused_slot_carries_nothing_of_its_last_sequence() -> None:
    """A server's slots are reused: a penalized sequence after others sees nothing of theirs,
    a penalized slot beside a forgotten one keeps its own marks, and once no slot's penalty
    reads the generated bytes the mask is all clear (cheapest: no gather)."""
    tracker = RepetitionTracker(2, 256)
    tracker.reset(0, SamplingParams(8, repetition_penalty=1.5))
    tracker.reset(1, SamplingParams(8, repetition_penalty=1.5))
    tracker.push([0, 1], list(b"xy"))
    tracker.forget(0)  # slot 0's next sequence has no penalty
    mask = tracker.repeated([0, 1])
    assert mask[1].nonzero()[:, 0].tolist() == [ord("y")]
    tracker.forget(1)
    assert not tracker.repeated([0, 1]).any()  # no byte-penalty slot left: all clear
    tracker.reset(0, SamplingParams(8, repetition_penalty=1.5, repetition_ngram_size=2))
    tracker.push([0], list(b"a"))
    tracker.push([0], list(b"b"))
    assert tracker.repeated([0, 1]).nonzero().tolist() == []  # "a" seen once: no follower yet
    tracker.push([0], list(b"a"))
    assert tracker.repeated([0, 1]).nonzero().tolist() == [[0, ord("b")]]


_penalty_params = st.builds(
    lambda p, n, nr: SamplingParams(
        40, repetition_penalty=p, repetition_ngram_size=n, no_repeat_ngram_size=nr
    ),
    st.sampled_from([1.0, 1.2, 1.5, 3.0]),
    st.integers(1, 6),
    st.sampled_from([0, 0, 4]),
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 10_000), params=st.lists(_penalty_params, min_size=1, max_size=4))
def test_repetition_penalty_rows_are_deterministic_and_independent_of_their_batch(
    make_model: Callable[..., RET], seed: int, params: list[SamplingParams]
) -> None:
    model = make_model(seed=seed % 5)
    emb = torch.randn(len(params), 768, generator=torch.Generator().manual_seed(seed))
    batched = generate(model, emb, params)
    assert [r.token_ids for r in generate(model, emb, params)] == [r.token_ids for r in batched]
    uncached = generate(model, emb, params, use_cache=False)
    assert [r.token_ids for r in uncached] == [r.token_ids for r in batched]
    for i, p in enumerate(params):
        (alone,) = generate(model, emb[i : i + 1], [p])
        assert alone.token_ids == batched[i].token_ids
        if p.repetition_penalty == 1.0:  # off: exactly what the loop breakers alone give
            (plain,) = generate(
                model,
                emb[i : i + 1],
                [SamplingParams(40, no_repeat_ngram_size=p.no_repeat_ngram_size)],
            )
            assert plain.token_ids == alone.token_ids


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 10_000), penalty=st.sampled_from([1.3, 2.0]), n=st.integers(1, 4))
def test_sampled_rows_with_a_penalty_repeat_with_their_seed(
    make_model: Callable[..., RET], seed: int, penalty: float, n: int
) -> None:
    model = make_model(seed=seed % 3)
    emb = torch.randn(2, 768, generator=torch.Generator().manual_seed(seed))
    params = [
        SamplingParams(
            32, temperature=0.9, seed=seed + i, repetition_penalty=penalty, repetition_ngram_size=n
        )
        for i in range(2)
    ]
    first, second = generate(model, emb, params), generate(model, emb, params)
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
