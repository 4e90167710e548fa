"""The Scheduler alone: random operation sequences keep every slot and sequence accounted
for."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retd.server.scheduler import (
    Finished,
    QueueFullError,
    Step,
)
from tests.scheduler._scheduler import (
    BYTE,
    scheduler,
    state,
)

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
