"""The byte tokenizer of RET: one token per UTF-8 byte, byte 0 doubles as EOS."""

from __future__ import annotations

import operator
from collections.abc import Iterable

EOS_ID = 0
VOCAB_SIZE = 256
_REPLACEMENT = "\ufffd"


def encode(text: str) -> list[int]:
    """The UTF-8 bytes of text, as token ids."""
    return list(text.encode("utf-8"))


def decode(token_ids: Iterable[int]) -> str:
    """Bytes back to text. Never raises: invalid UTF-8 and ids outside 0..255 become U+FFFD."""
    parts: list[str] = []
    run = bytearray()
    for token in token_ids:
        try:
            value = operator.index(token)
        except TypeError:
            value = -1
        if 0 <= value < VOCAB_SIZE:
            run.append(value)
            continue
        parts.append(run.decode("utf-8", errors="replace"))
        parts.append(_REPLACEMENT)
        run.clear()
    parts.append(run.decode("utf-8", errors="replace"))
    return "".join(parts)
