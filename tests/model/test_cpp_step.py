"""The C++ decode step (model/cpp_step.py) against the eager RET.step: bitwise the same logits
and cache writes for any shape, any rows, any positions; the same greedy text. Its prefix
attention: SDPA over each row's own prefix to rounding; the prefix step, bitwise the eager
step's ops with that attention in SDPA's place; and the same greedy text."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retd.model import cpp_step
from retd.model.checkpoint import load_checkpoint
from retd.model.cpp_step import (
    CppStep,
    RowControls,
    load_extension,
    step_function,
    step_name,
)
from retd.model.generation import NGramBlocker, RepetitionTracker, SamplingParams, generate
from retd.model.model import RET, CausalSelfAttention, KVCache, RETConfig
from retd.model.sampling import Sampler

CHECKPOINTS = Path(__file__).resolve().parents[2] / "model" / "checkpoints"


@st.composite
def shapes(draw: st.DrawFn) -> RETConfig:
    n_head = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([2, 8, 16]))
    return RETConfig(
        embedding_dim=draw(st.sampled_from([8, 768])),
        n_embd=n_head * head_dim,
        n_head=n_head,
        n_layer=draw(st.integers(1, 3)),
        mlp_hidden=draw(st.sampled_from([8, 48])),
        vocab_size=draw(st.sampled_from([256, 300])),
        max_length=draw(st.sampled_from([4, 33])),
        rope_base=draw(st.sampled_from([10000.0, 500.0])),
        conditioning=draw(st.sampled_from(["add", "layer"])),
        block_repeat=draw(st.sampled_from([1, 1, 2])),
    )


def draw_rows(data: st.DataObject, length: int) -> tuple[int, list[int], list[int]]:
    """A cache's slot count, and rows each in a slot of its own at a position < length."""
    num_slots = data.draw(st.integers(1, 6))
    order = data.draw(st.permutations(list(range(num_slots))))
    slots = order[: data.draw(st.integers(1, num_slots))]
    return num_slots, slots, [data.draw(st.integers(0, length - 1)) for _ in slots]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=shapes(), data=st.data())
def test_a_step_is_bitwise_the_eager_step(config: RETConfig, data: st.DataObject) -> None:
    """Rows in any slots at any positions (each its own), over a cache with earlier positions
    filled: the same logits and the same cache afterwards, to the bit."""
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    model = RET(config).eval().requires_grad_(False)
    num_slots, slots, positions = draw_rows(data, config.max_length)
    eager_cache = KVCache(config, num_slots)
    eager_cache.k.normal_()
    eager_cache.v.normal_()
    cpp_cache = KVCache(config, num_slots)
    cpp_cache.k.copy_(eager_cache.k)
    cpp_cache.v.copy_(eager_cache.v)
    cond = model.condition(torch.randn(len(slots), config.embedding_dim))
    tokens = torch.randint(0, config.vocab_size, (len(slots),))
    args = (torch.tensor(positions), torch.tensor(slots))
    # length and span as the engine passes them, or left for the step to read
    known = data.draw(st.booleans())
    extra = (max(positions) + 1, max(slots) + 1) if known else ()
    with torch.inference_mode():
        eager = model.step(cond, tokens, args[0], eager_cache, args[1], *extra)
        compiled = CppStep(model)(cond, tokens, args[0], cpp_cache, args[1], *extra)
    assert torch.equal(eager, compiled)
    assert torch.equal(eager_cache.k, cpp_cache.k) and torch.equal(eager_cache.v, cpp_cache.v)


@settings(max_examples=60, deadline=None)
@given(
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([1, 2, 7, 8, 16, 32, 40]),
    length=st.integers(1, 80),
    data=st.data(),
)
def test_prefix_attention_is_sdpa_over_each_rows_own_prefix(
    heads: int, head_dim: int, length: int, data: st.DataObject
) -> None:
    """Rows in any slots at any positions of a cache with garbage past them: each row's output
    is SDPA over its own slot's positions 0..p, to float32 rounding."""
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    num_slots, slots, positions = draw_rows(data, length)
    k_cache = torch.randn(num_slots, heads, length, head_dim) * 3
    v_cache = torch.randn(num_slots, heads, length, head_dim)
    q = torch.randn(len(slots), heads, 1, head_dim) * 3
    got = load_extension().prefix_attention(
        q, k_cache, v_cache, torch.tensor(slots), torch.tensor(positions)
    )
    for row, (slot, position) in enumerate(zip(slots, positions, strict=True)):
        prefix = slice(0, position + 1)
        keys, values = k_cache[slot, None, :, prefix], v_cache[slot, None, :, prefix]
        expected = F.scaled_dot_product_attention(q[row : row + 1], keys, values)
        torch.testing.assert_close(got[row : row + 1], expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([16, 32, 64, 128]),
    length=st.integers(1, 80),
    data=st.data(),
)
def test_the_fixed_head_size_kernels_are_bitwise_the_runtime_one(
    heads: int, head_dim: int, length: int, data: st.DataObject
) -> None:
    """A head of 16, 32, 64 or 128 attends with a kernel compiled for its size (with AVX2
    where the CPU has it): the same products and sums as the kernel that takes the size at
    run time, so the same bits."""
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    num_slots, slots, positions = draw_rows(data, length)
    k_cache = torch.randn(num_slots, heads, length, head_dim) * 3
    v_cache = torch.randn(num_slots, heads, length, head_dim)
    q = torch.randn(len(slots), heads, 1, head_dim) * 3
    rows = (torch.tensor(slots), torch.tensor(positions))
    extension = load_extension()
    served = extension.prefix_attention(q, k_cache, v_cache, *rows)
    portable = extension.prefix_attention(q, k_cache, v_cache, *rows, kernel="portable")
    runtime = extension.prefix_attention(q, k_cache, v_cache, *rows, kernel="runtime")
    assert torch.equal(served, runtime)
    assert torch.equal(portable, runtime)


def test_prefix_attention_refuses_rows_outside_the_cache() -> None:
    cache = torch.zeros(2, 1, 4, 8)
    q = torch.zeros(1, 1, 1, 8)
    extension = load_extension()
    with pytest.raises(RuntimeError, match="row 0 has slot 2 and position 0 outside the cache"):
        extension.prefix_attention(q, cache, cache, torch.tensor([2]), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="row 0 has slot 0 and position 4 outside the cache"):
        extension.prefix_attention(q, cache, cache, torch.tensor([0]), torch.tensor([4]))
    with pytest.raises(RuntimeError, match="float32 CPU tensors only"):
        extension.prefix_attention(q.double(), cache, cache, torch.tensor([0]), torch.tensor([0]))


def test_a_step_refuses_a_row_outside_the_cache(tiny_model: RET) -> None:
    """The C++ step checks its rows against the cache as index_put_ did."""
    cache = KVCache(tiny_model.config, 2)
    cond = tiny_model.condition(torch.randn(1, tiny_model.config.embedding_dim))
    with pytest.raises(RuntimeError, match="row 0 has slot 5 and position 0 outside the cache"):
        CppStep(tiny_model)(cond, torch.tensor([1]), torch.tensor([0]), cache, torch.tensor([5]))


def test_a_step_refuses_a_history_it_cannot_write(tiny_model: RET) -> None:
    """The token history is checked as the cache is: its dtype and shape, and each row."""
    cache = KVCache(tiny_model.config, 2)
    cond = tiny_model.condition(torch.randn(1, tiny_model.config.embedding_dim))
    step, L = CppStep(tiny_model), tiny_model.config.max_length
    args = (cond, torch.tensor([1]), torch.tensor([3]), cache, torch.tensor([1]))
    with pytest.raises(RuntimeError, match="row 0 has slot 1 and position 3 outside the history"):
        step(*args, history=torch.zeros(1, L, dtype=torch.long))
    with pytest.raises(RuntimeError, match="history must be a contiguous"):
        step(*args, history=torch.zeros(2, L, dtype=torch.int32))
    history = torch.zeros(2, L, dtype=torch.long)
    step(*args, history=history)
    assert history[1, 2] == 1 and history.count_nonzero() == 1  # the input token, at 3 - 1


def prefix_case(
    config: RETConfig, data: st.DataObject
) -> tuple[RET, tuple[torch.Tensor, ...], tuple[KVCache, KVCache]]:
    """A random model of `config`, a step's inputs (cond, tokens, positions, slots) for rows
    drawn from `data`, and two equal caches with garbage in them, one for each way."""
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    model = RET(config).eval().requires_grad_(False)
    num_slots, slots, drawn = draw_rows(data, config.max_length)
    caches = KVCache(config, num_slots), KVCache(config, num_slots)
    caches[0].k.normal_()
    caches[0].v.normal_()
    caches[1].k.copy_(caches[0].k)
    caches[1].v.copy_(caches[0].v)
    cond = model.condition(torch.randn(len(slots), config.embedding_dim))
    tokens = torch.randint(0, config.vocab_size, (len(slots),))
    return model, (cond, tokens, torch.tensor(drawn), torch.tensor(slots)), caches


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=shapes(), data=st.data())
def test_a_prefix_step_is_the_eager_step_to_rounding(
    config: RETConfig, data: st.DataObject
) -> None:
    """The prefix-attention step: the eager step's logits and cache writes to float32
    rounding, for any shape, rows, slots and positions."""
    model, (cond, tokens, positions, rows), caches = prefix_case(config, data)
    with torch.inference_mode():
        eager = model.step(cond, tokens, positions, caches[0], rows)
        prefix = CppStep(model, prefix=True)(cond, tokens, positions, caches[1], rows)
    torch.testing.assert_close(prefix, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[1].v, caches[0].v, rtol=1e-4, atol=1e-4)


def _attention_through_prefix_attention(
    self: CausalSelfAttention,
    x: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    length: int | None = None,
    span: int | None = None,
) -> torch.Tensor:
    """CausalSelfAttention.step with the extension's prefix_attention where SDPA was: ATen's
    RoPE, index_put_ cache writes, then attention over each row's own prefix."""
    B, _, C = x.shape
    q, k, v = self._heads(x)
    q, k = self._rope(q, k, positions[:, None])
    k_cache[slots, :, positions] = k[:, :, 0]
    v_cache[slots, :, positions] = v[:, :, 0]
    y = load_extension().prefix_attention(q, k_cache, v_cache, slots, positions)
    return self.proj(y.transpose(1, 2).reshape(B, 1, C))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=shapes(), data=st.data())
def test_a_prefix_step_is_bitwise_the_eager_ops_around_prefix_attention(
    config: RETConfig, data: st.DataObject
) -> None:
    """The prefix step rotates, writes the cache and attends in one pass per row and head:
    the same logits and cache, to the bit, as the eager step's ops with prefix_attention in
    SDPA's place (so the 500 held-out outputs measured for prefix attention still hold)."""
    model, (cond, tokens, positions, rows), caches = prefix_case(config, data)
    with pytest.MonkeyPatch.context() as patch, torch.inference_mode():
        patch.setattr(CausalSelfAttention, "step", _attention_through_prefix_attention)
        reference = model.step(cond, tokens, positions, caches[0], rows)
    with torch.inference_mode():
        fused = CppStep(model, prefix=True)(cond, tokens, positions, caches[1], rows)
    assert torch.equal(fused, reference)
    assert torch.equal(caches[1].k, caches[0].k) and torch.equal(caches[1].v, caches[0].v)


def test_bfloat16_steps_are_bitwise_the_eager_ones() -> None:
    config = RETConfig(n_embd=64, n_head=2, n_layer=2, mlp_hidden=96)
    model = RET(config).to(torch.bfloat16).eval().requires_grad_(False)
    embeddings = torch.randn(8, 768)
    params = [SamplingParams(max_new_tokens=40)] * 8
    eager = generate(model, embeddings, params)
    compiled = generate(model, embeddings, params, step=CppStep(model))
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]
    assert [r.mean_logprob for r in compiled] == [r.mean_logprob for r in eager]


@pytest.mark.parametrize("impl", ["cpp", "prefix"])
@pytest.mark.parametrize("name", ["ret_v21", "ret_v21_bpe", "ret_v21_bpe1792"])
def test_greedy_text_of_a_shipped_checkpoint_is_unchanged(name: str, impl: str) -> None:
    """Many embeddings, decoded together (rows leave the batch as they end) with the default
    loop breaker on: every token the eager step's, and with `cpp` every logprob too, for any
    embeddings. (The prefix step rounds differently from SDPA: measured on 500 held-out texts
    per checkpoint it changed no greedy output; here 48 fixed embeddings.)"""
    loaded = load_checkpoint(CHECKPOINTS / name)
    generator = torch.Generator().manual_seed(15) if impl == "prefix" else None
    embeddings = torch.randn(48, loaded.config.embedding_dim, generator=generator)
    params = [
        SamplingParams(max_new_tokens=n, repetition_penalty=1.5, repetition_ngram_size=4)
        for n in range(8, 8 + 48 * 2, 2)
    ]
    eager = generate(loaded.model, embeddings, params, tokenizer=loaded.tokenizer)
    compiled = generate(
        loaded.model,
        embeddings,
        params,
        tokenizer=loaded.tokenizer,
        step=step_function(loaded.model, impl),
    )
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]
    if impl == "cpp":
        assert [r.mean_logprob for r in compiled] == [r.mean_logprob for r in eager]
    assert len({r.text for r in eager}) > 10  # the embeddings were told apart


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=shapes(), data=st.data())
def test_condition_rows_are_the_models_conditioning_bitwise(
    config: RETConfig, data: st.DataObject
) -> None:
    """The rows a decode call reads, its joiners conditioned into their slots first: what
    `RET.condition` and indexing give, to the bit."""
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    model = RET(config).eval().requires_grad_(False)
    num_slots, slots, _ = draw_rows(data, 1)
    joining = data.draw(st.lists(st.sampled_from(slots), unique=True))
    embeddings = torch.randn(len(joining), config.embedding_dim) if joining else None
    before = torch.randn(num_slots, config.n_embd)
    expected = before.clone()
    if embeddings is not None:
        expected[torch.tensor(joining)] = model.condition(embeddings)
    got_cache = before.clone()
    rows = CppStep(model).condition_rows(
        got_cache,
        torch.tensor(slots),
        embeddings,
        torch.tensor(joining) if joining else None,
    )
    assert torch.equal(got_cache, expected)
    assert torch.equal(rows, expected[torch.tensor(slots)])


def test_condition_rows_keep_a_models_own_conditioning(tiny_model: RET) -> None:
    class Shifted(RET):
        def condition(self, embedding: torch.Tensor) -> torch.Tensor:
            return super().condition(embedding) + 1.0

    model = Shifted(tiny_model.config).eval().requires_grad_(False)
    embeddings = torch.randn(2, model.config.embedding_dim)
    cache = torch.zeros(3, model.config.n_embd)
    rows = CppStep(model).condition_rows(
        cache, torch.tensor([2, 0]), embeddings, torch.tensor([2, 0])
    )
    assert torch.equal(rows, model.condition(embeddings))


def test_step_function_picks_what_it_is_asked(tiny_model: RET) -> None:
    assert step_function(tiny_model, "eager") == tiny_model.step
    assert step_name(step_function(tiny_model, "eager")) == "eager"
    assert step_name(step_function(tiny_model, "cpp")) == "cpp"
    assert step_name(step_function(tiny_model, "prefix")) == "prefix"
    assert step_name(step_function(tiny_model, "auto")) == "prefix"
    with pytest.raises(ValueError, match="step_impl: expected one of auto, cpp, prefix, eager"):
        step_function(tiny_model, "jit")


def test_a_model_with_a_step_of_its_own_keeps_it(tiny_model: RET) -> None:
    class Doubled(RET):
        def step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            return 2 * super().step(*args, **kwargs)

    model = Doubled(tiny_model.config)
    assert step_function(model, "auto") == model.step
    for impl in ("cpp", "prefix"):
        with pytest.raises(RuntimeError, match=f"{impl}: Doubled has a decode step of its own"):
            step_function(model, impl)


def test_each_revision_of_the_sources_builds_an_extension_of_its_own(tmp_path: Path) -> None:
    """Daemons of two revisions building at once must not share torch's build directory."""
    source, header = tmp_path / "ret_step.cpp", tmp_path / cpp_step.HEADER.name
    source.write_text("// one\n")
    header.write_text("// header\n")
    first = cpp_step.source_digest(source)
    header.write_text("// header, changed\n")
    second = cpp_step.source_digest(source)
    source.write_text("// two\n")
    third = cpp_step.source_digest(source)
    assert len({first, second, third}) == 3
    assert load_extension().__name__.endswith(cpp_step.source_digest(cpp_step.SOURCE))


def test_auto_falls_back_to_eager_where_the_step_cannot_be_built(
    tiny_model: RET,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A source that does not compile stands for a machine without a compiler."""
    broken = tmp_path / "ret_step.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpp_step, "SOURCE", broken)
    monkeypatch.setattr(cpp_step, "_EXTENSION_NAME", "retd_ret_step_broken")
    monkeypatch.setattr(cpp_step, "_extension", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    with caplog.at_level(logging.WARNING, logger=cpp_step.__name__):
        assert step_function(tiny_model, "auto") == tiny_model.step
    assert "cannot be built here" in caplog.text
    with pytest.raises(RuntimeError, match="step_impl cpp: the C\\+\\+ step cannot be built"):
        step_function(tiny_model, "cpp")


def test_the_step_benchmark_runs_each_way_the_eager_way(tiny_model: RET) -> None:
    """`python -m retd.model.step_bench`: the C++ and the scripted steps it times decode what
    the eager step decodes (torch.compile's way is left out here: it compiles for minutes)."""
    from retd.model.step_bench import run, run_calls, ways

    found = ways(tiny_model)
    reference, _ = run(found["eager"], tiny_model, 3, 8)
    for name in ("cpp", "torchscript"):
        logits, ms = run(found[name], tiny_model, 3, 8)
        assert torch.equal(logits, reference), name
        assert ms > 0
    for per_call in (1, 3, 8):  # several steps a call: the argmax at every step
        prefix = found["prefix"]
        assert isinstance(prefix, CppStep)
        tokens, ms = run_calls(prefix, tiny_model, 3, 8, spread=True, per_call=per_call)
        spread_reference, _ = run(prefix, tiny_model, 3, 8, spread=True)
        assert torch.equal(tokens, spread_reference.argmax(-1)), per_call


def _row_params(data: st.DataObject, max_new_tokens: int) -> SamplingParams:
    """A greedy row, or a sampled one (seeded or not, top-k and top-p or not), with any of the
    loop breakers Decode's defaults and cards use."""
    sampled = data.draw(st.booleans())
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=data.draw(st.sampled_from([0.5, 1.0, 1.7])) if sampled else 0.0,
        seed=data.draw(st.sampled_from([None, 7, 2**63 + 5])) if sampled else None,
        top_k=data.draw(st.sampled_from([0, 1, 2, 50])) if sampled else 0,
        top_p=data.draw(st.sampled_from([1.0, 0.3, 0.5, 0.9])) if sampled else 1.0,
        no_repeat_ngram_size=data.draw(st.sampled_from([0, 0, 1, 2, 3])),
        repetition_penalty=data.draw(st.sampled_from([1.0, 1.5, 0.7, 3.0])),
        repetition_ngram_size=data.draw(st.integers(1, 4)),
        eos_bias=data.draw(st.sampled_from([0.0, 0.0, -3.0, 2.5])),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decode_is_bitwise_sampling_a_step_at_a_time(data: st.DataObject) -> None:
    """Several steps in one call, greedy and sampled rows (seeded, or with the u the sampler
    would have drawn; top-k and top-p), loop breakers and all (on a vocabulary small enough
    that rows repeat themselves at once, and a row whose every token is banned cannot draw):
    the tokens, log-probabilities and cache a step at a time gives, to the bit, for rows in
    any slots, joining or midway."""
    config = RETConfig(
        embedding_dim=16,
        n_embd=16,
        n_head=2,
        n_layer=2,
        mlp_hidden=24,
        vocab_size=data.draw(st.sampled_from([5, 12])),
        max_length=40,
    )
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    model = RET(config).eval().requires_grad_(False)
    num_slots, slots, _ = draw_rows(data, 1)
    steps = data.draw(st.integers(1, 6))
    # Each row has some history, written a step at a time first (positions 0..start-1).
    starts = [data.draw(st.integers(0, 30)) for _ in slots]
    params = [_row_params(data, config.max_length) for _ in slots]
    cond = model.condition(torch.randn(len(slots), config.embedding_dim))
    caches = KVCache(config, num_slots), KVCache(config, num_slots)
    history = torch.zeros(num_slots, config.max_length, dtype=torch.long)
    step = CppStep(model, prefix=True)
    slot_tensor = torch.tensor(slots)
    with torch.inference_mode():
        # the rows' pasts: random tokens at positions below their start, in both caches
        for position in range(max(starts)):
            live = [i for i, start in enumerate(starts) if position < start]
            if not live:
                continue
            tokens = torch.randint(0, config.vocab_size, (len(live),))
            for cache in caches:
                step(
                    cond[live],
                    tokens,
                    torch.full((len(live),), position),
                    cache,
                    slot_tensor[live],
                    history=history,
                )
        tokens = torch.randint(0, config.vocab_size, (len(slots),))
        args = (cond, tokens, torch.tensor(starts), slot_tensor)
        # the u the sampler draws for unseeded rows, a step at a time
        draws = data.draw(st.integers(0, 2**16))
        torch.manual_seed(draws)
        uniforms = torch.stack([torch.rand(len(slots)) for _ in range(steps)])
        # the reference rebuilds each row's history from the one the steps wrote
        torch.manual_seed(draws)
        reference = _one_step_at_a_time_with_history(
            step, args, caches[0], params, steps, history.clone(), config.vocab_size
        )
        controls = RowControls.of(params, eos_id=0, vocab_size=config.vocab_size)
        assert controls.needs_uniforms == bool((~controls.greedy & ~controls.seeded).any())
        got = step.decode(
            cond,
            tokens,
            torch.tensor(starts),
            caches[1],
            slot_tensor,
            num_slots,
            history,
            controls,
            steps,
            uniforms if controls.needs_uniforms else None,
        )
    assert torch.equal(got[0], reference[0])
    torch.testing.assert_close(got[1], reference[1], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(caches[1].k, caches[0].k) and torch.equal(caches[1].v, caches[0].v)


def _one_step_at_a_time_with_history(
    step: CppStep,
    args: tuple[torch.Tensor, ...],
    cache: KVCache,
    params: list[SamplingParams],
    steps: int,
    history: torch.Tensor,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the engine does a step at a time, its blockers and trackers first fed each row's
    past tokens: feed each row's input token to its no-repeat blocker and repetition tracker,
    run the step, sample the batch."""
    cond, tokens, positions, slots = args
    blockers = [
        NGramBlocker(p.no_repeat_ngram_size) if p.no_repeat_ngram_size else None for p in params
    ]
    repeats = RepetitionTracker(cache.k.shape[1], vocab_size)
    for i, (slot, start) in enumerate(zip(slots.tolist(), positions.tolist(), strict=True)):
        repeats.reset(slot, params[i])
        for token in history[slot, : max(start - 1, 0)].tolist():
            if blockers[i] is not None:
                blockers[i].push(token)
            if params[i].penalizes:
                repeats.push([slot], [token])
    sampler = Sampler(eos_id=0)
    out_tokens, out_logprobs = [], []
    for _ in range(steps):
        for i, (slot, position, token) in enumerate(
            zip(slots.tolist(), positions.tolist(), tokens.tolist(), strict=True)
        ):
            if position > 0:
                if blockers[i] is not None:
                    blockers[i].push(token)
                if params[i].penalizes:
                    repeats.push([slot], [token])
        logits = step(cond, tokens, positions, cache, slots)
        banned = [b.banned() if b is not None else () for b in blockers]
        tokens, logprobs = sampler(
            logits, params, positions.tolist(), banned, repeats.repeated(slots.tolist())
        )
        out_tokens.append(tokens)
        out_logprobs.append(logprobs)
        tokens = tokens.clamp_min(0)  # a row that could not draw goes on from token 0
        positions = positions + 1
    return torch.stack(out_tokens), torch.stack(out_logprobs)


def test_the_step_benchmark_builds_a_revisions_step_to_time_against(tiny_model: RET) -> None:
    """`step_bench --baseline REV` builds the C++ step's sources as they were at REV into an
    extension of its own: at HEAD it steps as the project's step does (the same logits)."""
    from retd.model.step_bench import baseline_extension, run

    old = baseline_extension("HEAD")
    assert old is not load_extension()
    head = CppStep(tiny_model, prefix=True, extension=old)
    logits, ms = run(head, tiny_model, 3, 8, spread=True)
    assert torch.equal(logits, run(CppStep(tiny_model, prefix=True), tiny_model, 3, 8, True)[0])
    assert ms > 0


TINY_EXTENSION = """#include <Python.h>
#define CAT(a, b) a##b
#define INIT(name) CAT(PyInit_, name)
#define STR(a) #a
#define NAME(a) STR(a)
static PyModuleDef tiny = {PyModuleDef_HEAD_INIT, NAME(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
PyMODINIT_FUNC INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&tiny); }
"""


def test_a_build_killed_half_way_does_not_hang_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's `lock` file, as a builder killed while compiling leaves it behind, made every
    later daemon wait at start-up forever; the next builder now clears it and builds."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_EXTENSION)
    source.with_name(cpp_step.HEADER.name).write_text("// header\n")
    folder = cpp_step.build_directory("retd_tiny")
    folder.mkdir(parents=True)
    (folder / "lock").touch()  # what the killed builder left
    build = (
        "from pathlib import Path; from retd.model.cpp_step import build_extension; "
        f"print(build_extension('retd_tiny', Path({str(source)!r})).__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", build], capture_output=True, text=True, timeout=240, check=True
    )
    assert done.stdout.split() == ["retd_tiny"]
    assert not (folder / "lock").exists()
    assert (
        folder.parent.name.startswith("retd_") and folder.parent.parent == tmp_path / "extensions"
    )
