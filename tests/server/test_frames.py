"""The pipe framing between retd's processes (server/frames.py): a reader that gets the bytes
in any chunks takes every message once, whole and in order."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from retd.server.frames import frame, read_frame, take_frames, write_frame

MESSAGES = st.lists(
    st.tuples(st.text(max_size=20), st.lists(st.integers(), max_size=30), st.binary(max_size=200)),
    max_size=8,
)


@given(messages=MESSAGES, cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_take_frames_gives_each_message_once_in_order_whatever_the_chunks(
    messages: list[tuple[str, list[int], bytes]], cuts: list[int]
) -> None:
    stream = b"".join(frame(m) for m in messages)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    buffer, taken = bytearray(), []
    for start, end in zip(points, points[1:], strict=False):
        buffer += stream[start:end]
        taken += take_frames(buffer)
        consumed = sum(len(frame(m)) for m in taken)
        assert bytes(buffer) == stream[consumed:end]  # what stays: the unfinished message
        if buffer:  # the next message is not whole yet
            assert consumed + len(frame(messages[len(taken)])) > end
    assert taken == messages
    assert not buffer


def test_a_message_written_to_a_pipe_is_read_back() -> None:
    read_fd, write_fd = os.pipe()
    try:
        write_frame(write_fd, ("events", [1, 2, 3]))
        assert read_frame(read_fd) == ("events", [1, 2, 3])
    finally:
        os.close(read_fd)
        os.close(write_fd)
