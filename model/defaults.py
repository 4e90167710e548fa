"""Decode's loop breakers when a request leaves them unset (torch-free: the server's config,
`retd eval` and the decoding measurements read them from here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeDefaults:
    """The loop breakers of Decode, DecodeBatch and DecodeStream when a request leaves them
    unset: the best deterministic decoder measured on the shipped RET v2.1's held-out texts
    (README, "Decoding that does not loop"). Generate's defaults (all off) are not these."""

    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.5
    repetition_ngram_size: int = 4
