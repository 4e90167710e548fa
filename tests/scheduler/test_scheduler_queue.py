"""The Scheduler alone: the queue bound, cancellation, deadlines, priorities, failures."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retd.server.scheduler import (
    Aborted,
    AbortReason,
    QueueFullError,
)
from tests.scheduler._scheduler import (
    ids,
    run_step,
    scheduler,
    state,
)

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
