"""What a decode is asked (`SamplingParams`) and what it makes of its tokens (`OutputBuffer`:
text, stops, streamed deltas, the finish reason), torch-free: the server's front end builds
and checks requests with these without importing torch (`generation.py` runs them)."""

from __future__ import annotations

import codecs
import enum
import math
from dataclasses import dataclass, field

from .tokenizer import BYTES, Tokenizer

# What a multi-step decode call (model/cpp_step.py) gives in place of a token: a sampled row
# that could not draw, and a row that has no more tokens in the call (rows speculating on
# drafts give different numbers of tokens).
CANNOT_DRAW = -1
NO_TOKEN = -2


class FinishReason(enum.StrEnum):
    """Why a sequence ended."""

    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled. temperature 0 means greedy; top_k 0 and top_p 1 are off."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    # n > 0: never generate a byte that would repeat a byte n-gram already in the sequence
    # (a loop breaker for a small model; 0 is off).
    no_repeat_ngram_size: int = 0
    # p > 1: a softer loop breaker (CTRL-style): the logit of a byte that would repeat a byte
    # n-gram of size `repetition_ngram_size` already in the sequence is divided by p when
    # positive, multiplied by p when negative. n = 1 penalises every byte already generated
    # (CTRL as published). 1.0 is off.
    repetition_penalty: float = 1.0
    repetition_ngram_size: int = 1
    # b != 0: added to the end-of-sequence token's logit at every step, before the other
    # breakers and the draw (a length handling: b < 0 lengthens answers). 0 is off.
    eos_bias: float = 0.0

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, int | float)
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if (
            isinstance(self.top_p, bool)
            or not isinstance(self.top_p, int | float)
            or not 0 < self.top_p <= 1
        ):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an int in [0, 2**64), got {self.seed!r}")
        if isinstance(self.stop, str) or not isinstance(self.stop, tuple | list):
            raise ValueError(f"stop must be a tuple of strings, got {self.stop!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got {s!r}")
        object.__setattr__(self, "stop", tuple(self.stop))  # accept a list, store a tuple
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise ValueError(
                f"no_repeat_ngram_size must be an int >= 0 (0 = off), got "
                f"{self.no_repeat_ngram_size!r}"
            )
        if (
            isinstance(self.repetition_penalty, bool)
            or not isinstance(self.repetition_penalty, int | float)
            or not math.isfinite(self.repetition_penalty)
            or self.repetition_penalty <= 0
        ):
            raise ValueError(
                f"repetition_penalty must be a finite number > 0 (1 = off), got "
                f"{self.repetition_penalty!r}"
            )
        if not _is_int(self.repetition_ngram_size) or self.repetition_ngram_size < 1:
            raise ValueError(
                f"repetition_ngram_size must be an int >= 1, got {self.repetition_ngram_size!r}"
            )
        if (
            isinstance(self.eos_bias, bool)
            or not isinstance(self.eos_bias, int | float)
            or not math.isfinite(self.eos_bias)
        ):
            raise ValueError(f"eos_bias must be a finite number (0 = off), got {self.eos_bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalizes(self) -> bool:
        """Whether the repetition penalty is on."""
        return self.repetition_penalty != 1.0


class OutputBuffer:
    """The bytes generated for one sequence, its stop checks, and text deltas that never split a
    UTF-8 character. The model's `tokenizer` gives each token's bytes (one byte each for
    `BYTES`).

    Invariant: the concatenation of every take_delta() ever returned equals text() once finished,
    and is a prefix of it at any time.
    """

    def __init__(
        self, params: SamplingParams, eos_id: int = 0, tokenizer: Tokenizer = BYTES
    ) -> None:
        self.params = params
        self.eos_id = eos_id
        self._pieces = tokenizer.pieces
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self._bytes = bytearray()  # generated bytes, EOS excluded
        self._stops = [s.encode("utf-8") for s in params.stop]
        self._logprob_sum = 0.0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._fed = 0  # bytes already given to the incremental decoder
        self._flushed = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def mean_logprob(self) -> float:
        return self._logprob_sum / len(self.token_ids) if self.token_ids else 0.0

    def append(self, token: int, logprob: float) -> FinishReason | None:
        """Record a token; return why the sequence must end now, else None."""
        if self.finished:
            raise RuntimeError(f"cannot append to a sequence finished by {self.finish_reason}")
        token = int(token)
        self.token_ids.append(token)
        self._logprob_sum += float(logprob)
        if token == self.eos_id:
            self.finish_reason = FinishReason.EOS
        else:
            before = len(self._bytes)
            self._bytes += self._pieces[token]
            # Checked after every token, so a new match ends within the token's bytes.
            if self._stops and any(
                self._bytes.find(s, max(0, before - len(s) + 1)) >= 0 for s in self._stops
            ):
                self.finish_reason = FinishReason.STOP
            elif len(self.token_ids) >= self.params.max_new_tokens:
                self.finish_reason = FinishReason.LENGTH
        return self.finish_reason

    def _text_end(self) -> int:
        """Byte length of the final text: cut before the earliest stop match, if any."""
        starts = [i for i in (self._bytes.find(s) for s in self._stops) if i >= 0]
        return min(starts, default=len(self._bytes))

    def _holdback(self) -> int:
        """Length of the longest tail that is a proper prefix of some stop string."""
        longest = max((len(s) for s in self._stops), default=0)
        for k in range(min(longest - 1, len(self._bytes)), 0, -1):
            tail = bytes(self._bytes[-k:])
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0

    def text(self) -> str:
        """Bytes before EOS, cut before the earliest stop match, decoded with errors="replace"."""
        return self._bytes[: self._text_end()].decode("utf-8", errors="replace")

    def take_delta(self) -> str:
        """Text produced since the last call: complete characters only, holding back any tail that
        could still become a stop string; once finished, everything left."""
        if self._flushed:
            return ""
        if self.finished:
            end, final = self._text_end(), True
            self._flushed = True
        else:
            end, final = len(self._bytes) - self._holdback(), False
        if end < self._fed:  # cannot happen: held-back bytes always cover a future cut
            raise AssertionError("stop match cut into text already streamed")
        delta = self._decoder.decode(bytes(self._bytes[self._fed : end]), final=final)
        self._fed = end
        return delta
