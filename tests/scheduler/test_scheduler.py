"""The Scheduler alone: no model, no tensors, fake tokens and explicit clock values."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retd.model.generation import FinishReason, OutputBuffer, SamplingParams
from retd.server.requests import SequenceRequest
from retd.server.scheduler import (
    Aborted,
    AbortReason,
    Delta,
    Finished,
    QueueFullError,
    Scheduler,
    SchedulerConfig,
    SequenceState,
    Step,
)

BYTE = 65  # "A": a token that never ends a sequence by itself (EOS is 0)
EMBEDDING = np.zeros(4, dtype=np.float32)  # the scheduler never reads it


def state(
    seq_id: int,
    max_new_tokens: int = 5,
    *,
    priority: int = 0,
    deadline: float | None = None,
    arrival: float = 0.0,
    stop: tuple[str, ...] = (),
    stream: bool = False,
) -> SequenceState:
    params = SamplingParams(max_new_tokens=max_new_tokens, stop=stop)
    request = SequenceRequest(EMBEDDING, params, stream, deadline, priority)
    return SequenceState(seq_id, request, OutputBuffer(params, eos_id=0), arrival=arrival)


def scheduler(**config: object) -> Scheduler:
    return Scheduler(SchedulerConfig(**config))  # type: ignore[arg-type]


def run_step(
    s: Scheduler, now: float, token: int | dict[int, int] = BYTE
) -> tuple[Step, list[Delta | Finished]]:
    """schedule() then update() with `token` for every row (or per sequence id)."""
    step = s.schedule(now)
    tokens = [token.get(r.seq_id, BYTE) if isinstance(token, dict) else token for r in step.rows]
    return step, s.update(step, tokens, [-1.0] * len(tokens), now)


def ids(step: Step) -> list[int]:
    return [r.seq_id for r in step.rows]


def finished_ids(outcomes: list[Delta | Finished]) -> list[int]:
    return [o.seq_id for o in outcomes if isinstance(o, Finished)]


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


# ---- queue bound, cancellation, deadlines, failures ----------------------------------


@pytest.mark.parametrize("bound", [1, 3, 7])
def test_queue_bound_raises_queue_full_with_the_queue_length(bound: int) -> None:
    s = scheduler(max_batch_size=1, max_queue_size=bound)
    s.add(state(0, max_new_tokens=100))
    s.schedule(0.0)  # 0 runs: the bound counts waiting sequences only
    for i in range(1, bound + 1):
        s.add(state(i))
    with pytest.raises(QueueFullError) as info:
        s.add(state(bound + 1))
    message = str(info.value)
    assert "full" in message
    assert re.search(rf"\b{bound}\b", message), message
    assert s.num_waiting == bound
    # the refused sequence is unknown to the scheduler: it can be added once there is room
    s.cancel(1)
    step = s.schedule(1.0)
    assert [a.seq_id for a in step.aborted] == [1]
    s.add(state(bound + 1))
    assert s.num_waiting == bound


def test_zero_queue_size_refuses_everything() -> None:
    s = scheduler(max_batch_size=4, max_queue_size=0)
    with pytest.raises(QueueFullError):
        s.add(state(1))
    assert not s.has_work()


def test_cancelled_waiting_sequence_is_aborted_as_queued_and_never_gets_a_slot() -> None:
    s = scheduler(max_batch_size=1)
    s.add(state(1, max_new_tokens=3))
    s.add(state(2, max_new_tokens=3))
    s.add(state(3, max_new_tokens=3))
    run_step(s, 0.0)
    s.cancel(2)
    step, _ = run_step(s, 1.0)
    assert step.aborted == (Aborted(2, AbortReason.CANCELLED, "queued"),)
    assert s.num_waiting == 1
    seen = set()
    for t in range(2, 12):
        step, _ = run_step(s, float(t))
        seen.update(ids(step))
        assert 2 not in [a.seq_id for a in step.aborted]  # reported once only
    assert seen == {1, 3} and not s.has_work()


def test_cancelled_running_sequence_leaves_at_the_next_schedule() -> None:
    s = scheduler(max_batch_size=2)
    s.add(state(1, max_new_tokens=50))
    s.add(state(2, max_new_tokens=50))
    s.add(state(3, max_new_tokens=50))
    step, _ = run_step(s, 0.0)
    slot_of_1 = {r.seq_id: r.slot for r in step.rows}[1]
    s.cancel(1)
    step = s.schedule(1.0)
    assert step.aborted == (Aborted(1, AbortReason.CANCELLED, "generating"),)
    assert 1 not in ids(step)
    assert step.joined == (3,) and {r.seq_id: r.slot for r in step.rows}[3] == slot_of_1
    s.cancel(1)  # cancelling a gone sequence is a no-op
    s.cancel(999)
    assert s.schedule(2.0).aborted == ()


def test_deadline_passed_while_queued_aborts_as_queued() -> None:
    s = scheduler(max_batch_size=1)
    s.add(state(1, max_new_tokens=50))
    s.add(state(2, deadline=5.0))
    run_step(s, 0.0)
    step, _ = run_step(s, 4.999)
    assert step.aborted == () and s.num_waiting == 1
    step, _ = run_step(s, 5.0)
    assert step.aborted == (Aborted(2, AbortReason.DEADLINE, "queued"),)
    assert s.num_waiting == 0 and ids(step) == [1]


def test_deadline_passed_mid_generation_leaves_at_the_next_step() -> None:
    s = scheduler(max_batch_size=2)
    s.add(state(1, max_new_tokens=50, deadline=5.0))
    s.add(state(2, max_new_tokens=50))
    for t in (0.0, 1.0, 4.9):
        step, _ = run_step(s, t)
        assert ids(step) == [1, 2]
    step, _ = run_step(s, 5.0)
    assert step.aborted == (Aborted(1, AbortReason.DEADLINE, "generating"),)
    assert ids(step) == [2] and s.free_slots == 1


def test_idle_wait_reports_deadline_of_a_held_request() -> None:
    s = scheduler(max_batch_size=4, max_wait_ms=10_000)
    s.add(state(1, deadline=3.0, arrival=0.0))
    assert s.schedule(1.0).empty
    step = s.schedule(3.0)
    assert step.aborted == (Aborted(1, AbortReason.DEADLINE, "queued"),)
    assert step.wake_at is None and not s.has_work()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=12))
def test_priority_higher_first_fifo_among_equals(priorities: list[int]) -> None:
    s = scheduler(max_batch_size=1)
    s.add(state(-1, max_new_tokens=1))
    s.schedule(0.0)  # the blocker takes the only slot; everyone else queues
    for i, p in enumerate(priorities):
        s.add(state(i, max_new_tokens=1, priority=p))
    order = []
    now = 0.0
    while s.has_work():
        step, _ = run_step(s, now)
        order += list(step.joined)
        now += 1.0
    expected = sorted(range(len(priorities)), key=lambda i: (-priorities[i], i))
    assert order == expected


def test_fail_frees_slots_and_queue_entries_once() -> None:
    s = scheduler(max_batch_size=2)
    for i in range(3):
        s.add(state(i, max_new_tokens=50))
    step = s.schedule(0.0)
    assert ids(step) == [0, 1] and s.num_waiting == 1
    failed = s.fail([0, 2], "boom")
    assert failed == [
        Aborted(0, AbortReason.FAILED, "generating", "boom"),
        Aborted(2, AbortReason.FAILED, "queued", "boom"),
    ]
    assert (s.num_running, s.num_waiting, s.free_slots) == (1, 0, 1)
    assert s.fail([0, 2], "again") == []
    s.add(state(3, max_new_tokens=50))
    step = s.schedule(1.0)
    assert step.joined == (3,) and sorted(ids(step)) == [1, 3]
    assert 2 not in ids(s.schedule(2.0))


# ---- random operation sequences ------------------------------------------------------

OPS = st.sampled_from(["add", "add", "add", "cancel", "step", "step", "step", "fail"])


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    batch=st.integers(1, 4),
    queue=st.integers(0, 5),
    policy=st.sampled_from(["continuous", "static"]),
    wait_ms=st.sampled_from([0.0, 0.0, 1500.0]),
    data=st.data(),
)
def test_random_operations_keep_slots_and_account_for_every_sequence(
    batch: int, queue: int, policy: str, wait_ms: float, data: st.DataObject
) -> None:
    s = scheduler(max_batch_size=batch, max_queue_size=queue, batching=policy, max_wait_ms=wait_ms)
    accepted: set[int] = set()
    ended: Counter[int] = Counter()
    slot_of: dict[int, int] = {}
    tokens_of: Counter[int] = Counter()
    next_id = 0
    now = 0.0

    def apply_step(step: Step, draw_tokens: bool) -> None:
        for a in step.aborted:
            assert a.seq_id in accepted
            ended[a.seq_id] += 1
            slot_of.pop(a.seq_id, None)
        row_slots = [r.slot for r in step.rows]
        assert len(set(row_slots)) == len(row_slots)  # never double-booked
        assert all(0 <= slot < batch for slot in row_slots)
        assert len(step.rows) == s.num_running + s.num_padding <= batch
        assert s.free_slots + s.num_running + s.num_padding == batch
        if policy == "continuous":
            assert s.num_padding == 0
        padding = [r for r in step.rows if r.padding]
        assert all(r.seq_id == -1 - r.slot and r.slot not in slot_of.values() for r in padding)
        row_slots = [r.slot for r in step.rows if not r.padding]
        for r in step.rows:
            if r.padding:
                continue
            assert ended[r.seq_id] == 0
            if r.seq_id in step.joined:
                assert r.position == 0 and r.seq_id not in slot_of
                slot_of[r.seq_id] = r.slot
            assert slot_of[r.seq_id] == r.slot  # a sequence keeps its slot
            assert r.position == tokens_of[r.seq_id]
        assert set(slot_of.values()) == set(row_slots)
        if policy == "static" and step.joined:
            assert set(step.joined) == {r.seq_id for r in step.rows}  # no padding then either
        if draw_tokens:
            token_st = st.sampled_from([0, BYTE, BYTE, BYTE, ord("!")])
            tokens = [data.draw(token_st, label="token") for _ in step.rows]
        else:
            tokens = [BYTE] * len(step.rows)
        for r in step.rows:
            if not r.padding:
                tokens_of[r.seq_id] += 1
        for outcome in s.update(step, tokens, [0.0] * len(tokens), now):
            if isinstance(outcome, Finished):
                ended[outcome.seq_id] += 1
                del slot_of[outcome.seq_id]
        assert s.free_slots + s.num_running + s.num_padding == batch

    for _ in range(data.draw(st.integers(1, 40), label="n_ops")):
        op = data.draw(OPS, label="op")
        now += data.draw(st.sampled_from([0.0, 0.1, 1.0]), label="dt")
        if op == "add":
            waiting_before = s.num_waiting
            deadline = data.draw(st.one_of(st.none(), st.floats(now, now + 5)), label="deadline")
            seq = state(
                next_id,
                max_new_tokens=data.draw(st.integers(1, 6), label="max_new"),
                priority=data.draw(st.integers(0, 2), label="priority"),
                deadline=deadline,
                arrival=now,
                stop=("!!",),
            )
            try:
                s.add(seq)
            except QueueFullError:
                assert waiting_before >= queue
            else:
                assert waiting_before < queue
                accepted.add(next_id)
            next_id += 1
        elif op == "cancel" and accepted:
            s.cancel(data.draw(st.sampled_from(sorted(accepted)), label="cancel"))
        elif op == "fail" and accepted:
            victim = data.draw(st.sampled_from(sorted(accepted)), label="fail")
            was_running = victim in slot_of
            for a in s.fail([victim], "injected"):
                assert a.seq_id == victim and ended[victim] == 0
                assert a.stage == ("generating" if was_running else "queued")
                ended[victim] += 1
                slot_of.pop(victim, None)
            assert s.free_slots + s.num_running + s.num_padding == batch
        elif op == "step":
            apply_step(s.schedule(now), draw_tokens=True)

    # drain: nothing accepted may be silently dropped
    for _ in range(200):
        if not s.has_work():
            break
        now += 1.0  # past every max_wait
        apply_step(s.schedule(now), draw_tokens=False)
    assert not s.has_work()
    assert (s.num_waiting, s.num_running, s.free_slots) == (0, 0, batch)
    assert set(ended) == accepted
    assert all(count == 1 for count in ended.values()), ended


def test_cancelling_a_waiting_sequence_frees_its_queue_place_at_once() -> None:
    s = scheduler(max_batch_size=1, max_queue_size=2)
    s.add(state(0, max_new_tokens=100))
    s.schedule(0.0)
    s.add(state(1))
    s.add(state(2))
    with pytest.raises(QueueFullError):
        s.add(state(3))
    s.cancel(1)  # no schedule() in between: the place is free now
    assert s.num_waiting == 1
    s.add(state(3))
    step = s.schedule(1.0)
    assert [a.seq_id for a in step.aborted] == [1]


def test_a_held_queue_wakes_for_the_earliest_deadline() -> None:
    s = scheduler(max_batch_size=4, max_wait_ms=1000)
    s.add(state(1, arrival=0.0, deadline=0.25))
    s.add(state(2, arrival=0.1))
    step = s.schedule(0.1)
    assert step.empty and step.wake_at == pytest.approx(0.25)  # not 1.0: a deadline comes first
    step = s.schedule(0.25)
    assert step.aborted == (Aborted(1, AbortReason.DEADLINE, "queued"),)
    assert step.empty and step.wake_at == pytest.approx(1.1)


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
