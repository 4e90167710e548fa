"""Decode's loop breakers when a request leaves them unset, and how decode steps run
(torch-free: the server's config, `retd eval` and the decoding measurements read them from
here)."""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, replace
from typing import Any

#: How a RET model's decode steps run (model/cpp_step.py): "cpp" (one C++ call a step, bitwise
#: the eager step), "prefix" (that call with attention over each row's own prefix: a float32
#: cache on the CPU), "eager" (RET.step), or "auto" (prefix when the extension builds here,
#: else eager).
STEP_IMPLS = ("auto", "cpp", "prefix", "eager")

#: The card key under which a checkpoint recommends its own Decode loop breakers.
CARD_KEY = "decode_defaults"
#: The bounds of each Decode field a request, a setting or a card may set (float bounds: a
#: float field); the server's settings and request checks read them from here.
BOUNDS = {
    "no_repeat_ngram_size": (0, 256),
    "repetition_penalty": (1.0, 10.0),
    "repetition_ngram_size": (1, 256),
    "eos_bias": (-20.0, 20.0),
}


@dataclass(frozen=True)
class DecodeDefaults:
    """The loop breakers of Decode, DecodeBatch and DecodeStream when a request leaves them
    unset: the best deterministic decoder measured on the shipped RET v2.1's held-out texts
    (README, "Decoding that does not loop"). Generate's defaults (all off) are not these."""

    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.5
    repetition_ngram_size: int = 4
    eos_bias: float = 0.0  # added to the EOS logit at every step; < 0 lengthens answers

    def for_card(self, card: Mapping[str, Any], pinned: Set[str] = frozenset()) -> DecodeDefaults:
        """These defaults with the ones a checkpoint's card recommends (`card["decode_defaults"]`,
        measured for that checkpoint by whoever trained it) in place of those not `pinned`
        (set explicitly by the server's operator: a flag, a variable or the TOML file)."""
        recommended = card.get(CARD_KEY)
        if not isinstance(recommended, Mapping):
            return self
        changes: dict[str, Any] = {}
        for name, (low, high) in BOUNDS.items():
            value = recommended.get(name)
            if name in pinned or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if low <= value <= high:  # else ignored, as a card from elsewhere may be
                changes[name] = float(value) if isinstance(low, float) else int(value)
        return replace(self, **changes)
