"""Batched sampling (model/sampling.py): the filters against a per-row reference, the
counter-based draws (seeded rows reproducible alone or in any batch), and the edge cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retd.model.generation import SamplingParams, generate
from retd.model.model import RET
from retd.model.sampling import (
    Sampler,
    counter_uniforms,
    filter_logits,
    sample,
    seed_key,
    splitmix64,
)

V = 256


def reference_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering of one row (V,), row by row: the sampler's semantics as the
    per-row loop had them before sampling was batched."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # keep a token while the mass before it < top_p
        remove = torch.zeros_like(logits, dtype=torch.bool)
        remove[order] = mass_before >= top_p
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


@st.composite
def filter_cases(draw: st.DrawFn) -> tuple[torch.Tensor, list[int], list[float]]:
    rows = draw(st.integers(1, 6))
    vocab = draw(st.sampled_from([1, 2, 5, 17, V]))
    seed = draw(st.integers(0, 2**31))
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))
    logits *= draw(st.sampled_from([0.1, 1.0, 8.0, 300.0]))
    if draw(st.booleans()):  # coarse values: many ties
        logits = logits.round()
    if draw(st.booleans()):  # banned entries
        logits[torch.rand(rows, vocab, generator=torch.Generator().manual_seed(seed)) < 0.3] = (
            float("-inf")
        )
        logits[:, 0] = 0.0  # every row keeps one finite entry
    top_k = draw(st.lists(st.sampled_from([0, 1, 2, 3, 10, 255, 256, 1000]), min_size=rows,
                          max_size=rows))  # fmt: skip
    top_p = draw(
        st.lists(
            st.one_of(
                st.just(1.0), st.sampled_from([1 - 2**-23, 1 - 2**-25]), st.floats(1e-6, 1.0)
            ),
            min_size=rows,
            max_size=rows,
        )
    )
    return logits, top_k, top_p


@settings(max_examples=300, deadline=None)
@given(case=filter_cases())
def test_the_batched_filter_keeps_what_the_per_row_reference_keeps(
    case: tuple[torch.Tensor, list[int], list[float]],
) -> None:
    logits, top_k, top_p = case
    batched = filter_logits(logits, torch.tensor(top_k), torch.tensor(top_p, dtype=torch.float64))
    for i in range(logits.shape[0]):
        expected = reference_filter(logits[i], top_k[i], top_p[i])
        finite = logits[i][logits[i].isfinite()]
        if finite.unique().numel() == finite.numel():  # no ties: the very same entries
            assert torch.equal(batched[i], expected), (i, top_k[i], top_p[i])
        else:  # the reference keeps an arbitrary part of a tie at the nucleus edge; the
            # batched filter keeps all of it: what it keeps more is tied with a kept token
            kept, reference_kept = batched[i].isfinite(), expected.isfinite()
            assert (kept | ~reference_kept).all(), i
            assert torch.isin(logits[i][kept & ~reference_kept], expected[reference_kept]).all()
            assert torch.equal(batched[i][reference_kept], expected[reference_kept])


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    vocab=st.sampled_from([2, 9, V]),
    scale=st.sampled_from([0.5, 3.0]),
    data=st.data(),
)
def test_the_nucleus_edge_is_where_the_per_row_reference_puts_it(
    seed: int, vocab: int, scale: float, data: st.DataObject
) -> None:
    """top_p exactly the mass before some token: the reference drops that token, and so must
    the batched filter (the same float sums, not just the same maths)."""
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    top_p = []
    for row in logits:
        probs = row.sort(descending=True).values.softmax(-1)
        mass_before = (probs.cumsum(-1) - probs)[1:]  # > 0
        top_p.append(min(1.0, mass_before[data.draw(st.integers(0, vocab - 2))].item()))
    batched = filter_logits(logits, torch.zeros(3, dtype=torch.long), torch.tensor(top_p))
    for i in range(3):
        assert torch.equal(batched[i], reference_filter(logits[i], 0, top_p[i])), i


@settings(max_examples=200, deadline=None)
@given(
    seeds=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=8),
    step=st.integers(0, 2**20),
)
def test_counter_uniforms_are_splitmix64_of_key_and_step(seeds: list[int], step: int) -> None:
    keys = torch.tensor([seed_key(s) for s in seeds])
    steps = torch.full_like(keys, step)
    expected = [
        (splitmix64((splitmix64(s) + step * 0x9E3779B97F4A7C15) & (2**64 - 1)) >> 40) / 2**24
        for s in seeds
    ]
    assert counter_uniforms(keys, steps).tolist() == expected


@pytest.mark.parametrize("seeded", [True, False])
def test_draws_follow_the_filtered_distribution(seeded: bool) -> None:
    n = 40_000
    probs = torch.tensor([0.4, 0.3, 0.2, 0.07, 0.03])
    logits = torch.full((V,), float("-inf"))
    logits[10:15] = probs.log()
    params = SamplingParams(1, temperature=1.0, top_k=4, seed=123 if seeded else None)
    tokens, _ = sample(logits.expand(n, V), [params] * n, torch.arange(n))
    counts = torch.bincount(tokens, minlength=V).float()
    assert counts[:10].sum() == 0 and counts[14:].sum() == 0  # banned, or cut by top-k
    expected = probs[:4] / probs[:4].sum() * n
    sigma = (expected * (1 - expected / n)).sqrt()
    assert ((counts[10:14] - expected).abs() < 4 * sigma).all(), counts[10:14]


sampling_params = st.builds(
    SamplingParams,
    max_new_tokens=st.just(1),
    temperature=st.sampled_from([0.0, 0.0, 1e-30, 0.05, 0.7, 1.0, 3.0]),
    top_k=st.sampled_from([0, 1, 5, 50, 256, 300]),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 1e-4]),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    repetition_penalty=st.sampled_from([1.0, 1.0, 1.8]),
)


@settings(max_examples=150, deadline=None)
@given(
    params=st.lists(sampling_params, min_size=1, max_size=8),
    step=st.integers(0, 300),
    data=st.data(),
)
def test_a_seeded_row_draws_the_same_alone_or_in_any_batch(
    params: list[SamplingParams], step: int, data: st.DataObject
) -> None:
    generator = torch.Generator().manual_seed(step)
    logits = torch.randn(len(params), V, generator=generator) * 3
    repeated = torch.rand(len(params), V, generator=generator) < 0.1
    banned = [set(range(i, V, 7)) for i in range(len(params))]
    tokens, logprobs = sample(logits, params, step, banned, repeated)
    order = data.draw(st.permutations(range(len(params))), label="order")
    shuffled, _ = sample(
        logits[order], [params[i] for i in order], step, [banned[i] for i in order],
        repeated[order],
    )  # fmt: skip
    for position, i in enumerate(order):
        p = params[i]
        alone, alone_logprob = sample(
            logits[i : i + 1], [p], step, [banned[i]], repeated[i : i + 1]
        )
        if p.greedy or p.seed is not None:
            assert tokens[i] == alone[0] == shuffled[position], (i, p)
            torch.testing.assert_close(logprobs[i], alone_logprob[0])
        assert tokens[i] not in banned[i] and 0 <= tokens[i] < V
    full = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs, full)  # unfiltered, temperature 1


def test_greedy_rows_take_the_argmax_in_a_sampled_batch() -> None:
    logits = torch.randn(6, V)
    params = [SamplingParams(1, temperature=0.0 if i % 2 else 2.0, seed=i) for i in range(6)]
    for step in range(5):
        tokens, _ = sample(logits, params, step)
        assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))


def test_a_tiny_temperature_is_greedy() -> None:
    logits = torch.randn(3, V) * 5
    for temperature in (1e-3, 1e-12, 1e-30, 1e-300):
        params = [SamplingParams(1, temperature=temperature, seed=i) for i in range(3)]
        for step in range(10):
            tokens, logprobs = sample(logits, params, step)
            assert torch.equal(tokens, logits.argmax(-1)), temperature
            assert logprobs.isfinite().all()


def test_filters_that_keep_everything_change_no_draw() -> None:
    logits = torch.randn(1, V)
    plain = SamplingParams(1, temperature=0.8, seed=9)
    same = [
        SamplingParams(1, temperature=0.8, top_k=k, top_p=p, seed=9)
        for k, p in ((256, 1.0), (1000, 1.0), (0, 1.0))
    ]
    for step in range(50):
        expected, _ = sample(logits, [plain], step)
        for p in same:
            assert sample(logits, [p], step)[0] == expected


def test_a_row_that_cannot_draw_gets_minus_one_and_its_batch_mates_are_unaffected() -> None:
    logits = torch.randn(4, V)
    params = [SamplingParams(1, temperature=1.0, seed=i) for i in range(3)] + [SamplingParams(1)]
    everything = set(range(V))
    clean, _ = sample(logits, params, 2)
    poisoned = logits.clone()
    poisoned[1] = float("nan")
    tokens, logprobs = sample(poisoned, params, 2, [(), (), everything, everything])
    # row 1: NaN logits; row 2: every token banned (sampled: cannot draw); row 3 greedy and
    # all banned: the argmax of all -inf, token 0, as before sampling was batched
    assert tokens.tolist() == [clean[0].item(), -1, -1, 0]
    assert logprobs[1:3].isnan().all() and logprobs[0].isfinite()


def test_generate_refuses_a_row_that_cannot_be_sampled(tiny_model: RET) -> None:
    emb = torch.full((1, 768), float("nan"))
    with pytest.raises(ValueError, match="cannot be sampled"):
        generate(tiny_model, emb, [SamplingParams(4, temperature=1.0, seed=0)])


def test_the_sampler_keeps_the_tensors_of_a_composition_until_it_changes() -> None:
    logits = torch.randn(3, V)
    params = [SamplingParams(1, temperature=1.0, top_k=7, seed=i) for i in range(3)]
    sampler = Sampler()
    first, _ = sampler(logits, params, 4)
    batch = sampler._batch
    again, _ = sampler(logits, list(params), 4)  # the same objects in a new list
    assert sampler._batch is batch and torch.equal(first, again)
    assert torch.equal(first, sample(logits, params, 4)[0])
    equal_but_new = [SamplingParams(1, temperature=1.0, top_k=7, seed=i) for i in range(3)]
    sampler(logits, equal_but_new, 4)
    assert sampler._batch is not batch
    sampler(logits[:2], params[:2], 4)  # a row left
    assert sampler._batch is not None and sampler._batch.size == 2


def test_sampling_reads_nothing_back_from_the_device() -> None:
    """On the meta device a tensor has no values: any .item(), .tolist(), int(), bool() or
    data-dependent shape in sample() raises, as it would sync on CUDA."""
    logits = torch.empty(4, V, device="meta")
    params = [
        SamplingParams(1),
        SamplingParams(1, temperature=0.7, top_k=5, top_p=0.9, seed=3, repetition_penalty=1.3),
        SamplingParams(1, temperature=1.0),
        SamplingParams(1, temperature=1.0, seed=1),
    ]
    repeated = torch.empty(4, V, dtype=torch.bool, device="meta")
    tokens, logprobs = sample(logits, params, [1, 2, 3, 4], [{1, 2}, (), {5}, ()], repeated)
    assert tokens.shape == logprobs.shape == (4,) and tokens.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):  # the check can fail
        tokens.tolist()


@settings(max_examples=50, deadline=None)
@given(
    biases=st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
    eos_id=st.integers(0, 9),
)
def test_eos_bias_moves_only_its_rows_eos_logit(
    biases: list[float], seed: int, eos_id: int
) -> None:
    """A greedy row with eos_bias b takes the argmax of its logits with b added at eos_id; its
    logprob is the model's own (unbiased); rows without a bias are untouched."""
    logits = torch.randn(len(biases), 10, generator=torch.Generator().manual_seed(seed))
    params = [SamplingParams(max_new_tokens=4, eos_bias=b) for b in biases]
    tokens, logprobs = sample(logits, params, eos_id=eos_id)
    biased = logits.clone()
    biased[:, eos_id] += torch.tensor(biases)
    assert tokens.tolist() == biased.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    assert torch.equal(logprobs, expected)
    plain, _ = sample(logits, [SamplingParams(max_new_tokens=4)] * len(biases), eos_id=eos_id)
    assert plain.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "1"])
def test_a_non_finite_eos_bias_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="eos_bias must be a finite number"):
        SamplingParams(max_new_tokens=4, eos_bias=bad)  # type: ignore[arg-type]
