"""Speculative decoding on n-gram drafts (`CppStep.decode` with a `Draft`): the guesses are
what the row's own text says follows its last n tokens, and a row that speculates gives the
same tokens and log-probabilities, to the bit, as it gives a step at a time."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retd.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from retd.model.cpp_step import CppStep, Draft, RowControls, load_extension
from retd.model.decoding import NO_TOKEN, SamplingParams
from retd.model.model import RET, KVCache


def reference_draft(generated: list[int], n: int, m: int) -> list[int]:
    """The newest earlier occurrence of the last n tokens, and what followed it, extended as
    the loop it implies would go on."""
    p = len(generated)
    if p <= n:
        return []
    for i in range(p - n - 1, -1, -1):
        if generated[i : i + n] == generated[p - n :]:
            text = list(generated)
            while len(text) < p + m:
                text.append(text[len(text) - (p - n - i)])
            return text[p:]
    return []


@settings(max_examples=300, deadline=None)
@given(
    generated=st.lists(st.integers(0, 3), max_size=24),
    n=st.integers(1, 4),
    m=st.integers(0, 6),
)
def test_a_draft_is_what_followed_the_last_n_tokens_before(
    generated: list[int], n: int, m: int
) -> None:
    assert load_extension().ngram_draft(generated, n, m) == reference_draft(generated, n, m)


def test_a_loop_is_drafted_once_it_has_shown_a_period() -> None:
    draft = load_extension().ngram_draft
    assert draft([5, 6, 7, 5, 6, 7, 5, 6], 3, 5) == [7, 5, 6, 7, 5]
    assert draft([9, 9, 9, 9], 3, 3) == [9, 9, 9]
    assert draft([1, 2, 3, 4], 2, 3) == []  # no earlier occurrence


def _decode(
    model: RET, params: list[SamplingParams], embeddings: torch.Tensor, draft: Draft | None
) -> tuple[list[list[int]], list[list[float]], int, int]:
    """Each row's tokens and log-probabilities to its EOS or its max_new_tokens, four steps a
    call, and the number of calls the longest row took and the most tokens a row took in
    one call."""
    step = CppStep(model, prefix=True)
    B = len(params)
    controls = RowControls.of(params, model.config.eos_id, model.config.vocab_size)
    tokens: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    with torch.inference_mode():
        cond = model.condition(embeddings)
        cache = KVCache(model.config, B)
        history = torch.zeros(B, model.config.max_length, dtype=torch.long)
        position = torch.zeros(B, dtype=torch.long)
        token = torch.zeros(B, dtype=torch.long)
        calls = most = 0

        def left(b: int) -> int:
            ended = model.config.eos_id in tokens[b]
            return 0 if ended else max(params[b].max_new_tokens - len(tokens[b]), 0)

        while any(left(b) for b in range(B)):
            room = torch.tensor([left(b) for b in range(B)])
            out, lp = step.decode(
                cond, token, position, cache, torch.arange(B), B, history, controls, 4,
                None, draft, room,
            )  # fmt: skip
            calls += 1
            assert draft is not None or out.shape[0] == 4
            for b in range(B):
                column = out[:, b].tolist()
                given = [t for t in column if t != NO_TOKEN]
                assert column == given + [NO_TOKEN] * (len(column) - len(given))
                taken = given[: left(b)]  # tokens past a row's room are dropped
                most = max(most, len(taken))
                tokens[b] += taken
                logprobs[b] += lp[: len(taken), b].tolist()
                position[b] += len(given)
                token[b] = given[-1]
    for b in range(B):
        end = len(tokens[b])
        if model.config.eos_id in tokens[b]:
            end = tokens[b].index(model.config.eos_id) + 1
        end = min(end, params[b].max_new_tokens)
        tokens[b], logprobs[b] = tokens[b][:end], logprobs[b][:end]
    return tokens, logprobs, calls, most


@pytest.mark.parametrize(
    ("params", "loops"),
    [
        (SamplingParams(max_new_tokens=100), True),
        (SamplingParams(max_new_tokens=100, repetition_penalty=1.2), False),
    ],
    ids=["plain greedy", "repetition penalty"],
)
def test_speculating_gives_the_same_tokens(params: SamplingParams, loops: bool) -> None:
    """The shipped checkpoint on 48 random embeddings: the same tokens and log-probabilities
    to the bit with drafts or without, some guesses kept (a row takes more tokens in a call
    than the call has steps); plain greedy, where some rows loop, in fewer calls."""
    model = load_checkpoint(DEFAULT_CHECKPOINT).model
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.nn.functional.normalize(torch.randn(48, 768, generator=generator), dim=1)
    rows = [params] * 48
    tokens, logprobs, calls, most = _decode(model, rows, embeddings, None)
    assert most <= 4
    for draft in (Draft(4, 3), Draft(2, 1)):
        got, got_logprobs, got_calls, got_most = _decode(model, rows, embeddings, draft)
        assert got == tokens
        assert got_logprobs == logprobs
        assert got_most > 4
        assert got_calls < calls or not loops
