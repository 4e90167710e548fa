"""The Scheduler alone: no model, no tensors, fake tokens and explicit clock values. Who
joins and leaves a step, and one-step models."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retd.model.decoding import NO_TOKEN
from retd.model.generation import FinishReason
from retd.server.scheduler import (
    Delta,
    Finished,
    Step,
)
from tests.scheduler._scheduler import (
    BYTE,
    finished_ids,
    ids,
    run_step,
    scheduler,
    state,
)

# ---- joining -------------------------------------------------------------------------


def test_lone_request_joins_at_the_first_schedule_without_waiting() -> None:
    s = scheduler(max_batch_size=4, max_wait_ms=0)
    s.add(state(1, arrival=100.0))
    step = s.schedule(100.0)
    assert step.joined == (1,)
    assert [(r.seq_id, r.position) for r in step.rows] == [(1, 0)]
    assert step.wake_at is None
    assert (s.num_waiting, s.num_running, s.free_slots) == (0, 1, 3)


@settings(max_examples=25, deadline=None)
@given(
    wait_ms=st.floats(1.0, 5000.0),
    batch=st.integers(2, 6),
    arrival=st.floats(0.0, 1e6),
)
def test_idle_model_holds_a_lone_request_until_max_wait_passes(
    wait_ms: float, batch: int, arrival: float
) -> None:
    s = scheduler(max_batch_size=batch, max_wait_ms=wait_ms)
    s.add(state(1, arrival=arrival))
    wake_at = arrival + wait_ms / 1e3
    for now in (arrival, arrival + wait_ms / 2e3):
        step = s.schedule(now)
        assert step.empty and step.joined == () and step.wake_at == pytest.approx(wake_at)
        assert (s.num_waiting, s.num_running) == (1, 0)
    step = s.schedule(wake_at + 1e-6)
    assert step.joined == (1,) and step.wake_at is None


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(2, 6), wait_ms=st.floats(10.0, 1000.0))
def test_idle_model_admits_at_once_when_enough_arrive_to_fill_the_batch(
    batch: int, wait_ms: float
) -> None:
    s = scheduler(max_batch_size=batch, max_wait_ms=wait_ms)
    for i in range(batch - 1):
        s.add(state(i, arrival=10.0))
        assert s.schedule(10.0).empty  # not yet enough, and no time has passed
    s.add(state(batch - 1, arrival=10.0))
    step = s.schedule(10.0)
    assert sorted(step.joined) == list(range(batch))
    assert sorted(r.slot for r in step.rows) == list(range(batch))


def test_max_wait_only_holds_an_idle_model_newcomers_join_a_running_batch_at_once() -> None:
    s = scheduler(max_batch_size=4, max_wait_ms=1000)
    s.add(state(1, max_new_tokens=50, arrival=0.0))
    assert s.schedule(0.0).empty
    run_step(s, 1.0)  # 1 joins once the wait passed
    s.add(state(2, arrival=1.5))
    step, _ = run_step(s, 1.5)  # far less than max_wait after 2 arrived
    assert step.joined == (2,) and ids(step) == [1, 2]


def test_continuous_policy_joins_newcomers_at_every_step() -> None:
    s = scheduler(max_batch_size=3)
    s.add(state(1, max_new_tokens=10))
    step, _ = run_step(s, 0.0)
    assert step.joined == (1,)
    s.add(state(2, max_new_tokens=10))
    step, _ = run_step(s, 0.1)
    assert step.joined == (2,)
    assert [(r.seq_id, r.position) for r in step.rows] == [(1, 1), (2, 0)]
    s.add(state(3, max_new_tokens=10))
    step, _ = run_step(s, 0.2)
    assert step.joined == (3,)
    assert [(r.seq_id, r.position) for r in step.rows] == [(1, 2), (2, 1), (3, 0)]


def test_static_policy_admits_only_into_an_empty_batch() -> None:
    s = scheduler(max_batch_size=2, batching="static")
    s.add(state(1, max_new_tokens=4))
    s.add(state(2, max_new_tokens=1))
    step, outcomes = run_step(s, 0.0)
    assert sorted(step.joined) == [1, 2] and finished_ids(outcomes) == [2]
    pad_slot = next(r.slot for r in step.rows if r.seq_id == 2)
    s.add(state(3, max_new_tokens=2))
    for t in range(1, 4):  # 1 still runs: 3 waits; 2's row stays in the batch as padding
        step, outcomes = run_step(s, float(t))
        assert ids(step) == [1, -1 - pad_slot] and step.joined == () and s.num_waiting == 1
        assert [r.position for r in step.rows] == [t, t]  # the padding row advances too
        assert (s.free_slots, s.num_padding) == ((0, 1) if t < 3 else (2, 0))
    assert finished_ids(outcomes) == [1]
    step, _ = run_step(s, 4.0)
    assert step.joined == (3,)


def test_continuous_policy_reuses_a_freed_slot_while_others_run() -> None:
    s = scheduler(max_batch_size=2)
    s.add(state(1, max_new_tokens=4))
    s.add(state(2, max_new_tokens=1))
    s.add(state(3, max_new_tokens=2))
    step, outcomes = run_step(s, 0.0)
    slots = {r.seq_id: r.slot for r in step.rows}
    assert finished_ids(outcomes) == [2] and s.num_waiting == 1
    step, _ = run_step(s, 1.0)
    assert step.joined == (3,)
    assert {r.seq_id: r.slot for r in step.rows} == {1: slots[1], 3: slots[2]}


# ---- leaving -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "stop", "reason", "text"),
    [
        ([BYTE, BYTE, 0], (), FinishReason.EOS, "AA"),
        ([BYTE] * 5, (), FinishReason.LENGTH, "AAAAA"),
        ([BYTE, ord("x"), ord("y")], ("xy",), FinishReason.STOP, "A"),
    ],
)
def test_a_finished_sequence_leaves_at_once_and_a_waiting_one_takes_its_slot(
    tokens: list[int], stop: tuple[str, ...], reason: FinishReason, text: str
) -> None:
    s = scheduler(max_batch_size=1)
    s.add(state(1, max_new_tokens=5, stop=stop))
    s.add(state(2, max_new_tokens=5))
    for i, token in enumerate(tokens):
        step, outcomes = run_step(s, float(i), token)
        assert ids(step) == [1]
    assert len(outcomes) == 1 and isinstance(outcomes[0], Finished)
    done = outcomes[0]
    assert done.seq_id == 1 and done.state.output.finish_reason is reason
    assert done.state.output.text() == text
    assert len(done.state.output.token_ids) == len(tokens)  # stopped at once, no extra step
    assert (s.num_running, s.free_slots) == (0, 1)
    step = s.schedule(float(len(tokens)))
    assert step.joined == (2,) and step.rows[0].slot == 0 and step.rows[0].position == 0


def test_stream_sequences_get_deltas_and_the_tail_in_finished() -> None:
    s = scheduler(max_batch_size=1)
    s.add(state(1, max_new_tokens=3, stream=True))
    _, out1 = run_step(s, 0.0, ord("h"))
    _, out2 = run_step(s, 1.0, ord("i"))
    _, out3 = run_step(s, 2.0, ord("!"))
    assert [type(o) for o in out1 + out2 + out3] == [Delta, Delta, Finished]
    assert [out1[0].text, out2[0].text, out3[0].tail_text] == ["h", "i", "!"]  # type: ignore[union-attr]


# ---- one-step models (phrase banks) ----------------------------------------------------


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_complete_ends_every_row_at_once_and_frees_its_slots(policy: str) -> None:
    s = scheduler(max_batch_size=2, batching=policy)
    for seq_id in (1, 2, 3):
        s.add(state(seq_id, max_new_tokens=1, arrival=0.0))
    step = s.schedule(1.0)
    assert ids(step) == [1, 2] and step.joined == (1, 2)
    finished = s.complete(step, 2.0)
    assert [f.seq_id for f in finished] == [1, 2]
    assert all(f.finished_at == 2.0 and f.tail_text == "" for f in finished)
    assert all(f.state.batch_min == f.state.batch_max == 2 for f in finished)
    assert (s.num_running, s.free_slots, s.num_padding, s.num_waiting) == (0, 2, 0, 1)
    step = s.schedule(3.0)
    assert ids(step) == [3]
    assert [f.seq_id for f in s.complete(step, 4.0)] == [3]
    assert not s.has_work()


def test_complete_after_a_failed_row_ends_the_others() -> None:
    s = scheduler(max_batch_size=4, batching="static")
    for seq_id in (1, 2, 3):
        s.add(state(seq_id, max_new_tokens=1))
    step = s.schedule(0.0)
    assert [a.seq_id for a in s.fail([2], "boom")] == [2]
    rest = Step(tuple(r for r in step.rows if r.seq_id != 2), step.new, ())
    assert [f.seq_id for f in s.complete(rest, 1.0)] == [1, 3]
    assert (s.num_running, s.free_slots, s.num_padding) == (0, 4, 0)


@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    steps_per_call=st.integers(1, 9),
    static=st.booleans(),
)
def test_a_step_allows_up_to_steps_per_call_never_past_the_longest_row(
    lengths: list[int], steps_per_call: int, static: bool
) -> None:
    """Step.steps: up to steps_per_call, no more than the longest running row has left, 1 for
    a static batch, whatever has been generated so far."""
    s = scheduler(
        max_batch_size=8,
        steps_per_call=steps_per_call,
        batching="static" if static else "continuous",
    )
    for i, n in enumerate(lengths):
        s.add(state(i, n))
    generated = 0
    while s.has_work():
        step = s.schedule(now=0.0)
        left = max(lengths) - generated
        assert step.steps == (1 if static else min(steps_per_call, left))
        s.update_steps(step, [([BYTE] * len(step.rows), [-1.0] * len(step.rows))], now=0.0)
        generated += 1


def test_update_steps_takes_each_rows_tokens_until_it_ends() -> None:
    """Three steps' tokens at once: a row that ends at the first (EOS) or second (its length)
    takes no more; the others take all three; deltas come in order."""
    s = scheduler(max_batch_size=4, steps_per_call=3)
    s.add(state(0, 5, stream=True))
    s.add(state(1, 2))
    s.add(state(2, 9))
    step = s.schedule(now=0.0)
    assert ids(step) == [0, 1, 2] and step.steps == 3
    eos = 0
    outcomes = s.update_steps(
        step,
        [([66, 67, eos], [-1.0] * 3), ([67, 67, 70], [-2.0] * 3), ([68, 71, 72], [-3.0] * 3)],
        now=1.0,
    )
    assert finished_ids(outcomes) == [2, 1]  # 2 at its EOS (step 1), 1 at its length (step 2)
    deltas = [o.text for o in outcomes if isinstance(o, Delta)]
    assert deltas == ["B", "C", "D"]  # sequence 0's three bytes, one step after the other
    assert s.num_running == 1 and s.free_slots == 3
    step = s.schedule(now=1.0)
    assert [(r.seq_id, r.position, r.token) for r in step.rows] == [(0, 3, 68)]
    assert step.steps == 2  # sequence 0 has 2 of its 5 left


def test_update_steps_skips_a_row_with_no_token_at_a_step() -> None:
    """Rows that speculated give different numbers of tokens in one call: a row whose token
    at a step is NO_TOKEN takes nothing there (nor after), the others go on."""
    s = scheduler(max_batch_size=4, steps_per_call=1)
    s.add(state(0, 9, stream=True))
    s.add(state(1, 9))
    step = s.schedule(now=0.0)
    assert ids(step) == [0, 1]
    outcomes = s.update_steps(
        step,
        [([66, 66], [-1.0] * 2), ([NO_TOKEN, 67], [-2.0] * 2), ([NO_TOKEN, 68], [-3.0] * 2)],
        now=1.0,
    )
    assert [o.text for o in outcomes if isinstance(o, Delta)] == ["B"]
    assert not finished_ids(outcomes)
    step = s.schedule(now=1.0)
    assert [(r.seq_id, r.position, r.token) for r in step.rows] == [(0, 1, 66), (1, 3, 68)]
