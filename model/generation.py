"""Batched generation for RET: per-row parameters, stop strings, streaming, loop breakers.

The per-step token choice (temperature, top-k, top-p, seeded draws) is `sampling.py`'s."""

from __future__ import annotations

import codecs
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .model import RET, KVCache
from .sampling import Sampler
from .tokenizer import BYTES, Tokenizer


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


class NGramBlocker:
    """The bytes a sequence may not generate next without repeating one of its byte n-grams:
    those that followed its last n-1 bytes before."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        self._history: list[int] = []
        self._followers: dict[tuple[int, ...], set[int]] = {}

    def push(self, token: int) -> None:
        """Record a generated byte (never the end-of-sequence one: it ends the sequence)."""
        history = self._history
        history.append(int(token))
        if len(history) >= self.n:
            prefix = tuple(history[len(history) - self.n : -1])
            self._followers.setdefault(prefix, set()).add(history[-1])

    def banned(self) -> set[int]:
        history = self._history
        if len(history) < self.n - 1:
            return set()
        return self._followers.get(tuple(history[len(history) - self.n + 1 :]), set())


class RepetitionTracker:
    """The bytes each row's repetition penalty applies to, as one (rows, V) bool tensor.

    A row with repetition_ngram_size 1 marks every byte it has generated (a scatter over the
    whole batch); a row with n > 1 marks the bytes that would repeat one of its byte n-grams
    (an `NGramBlocker`'s banned set). Rows are slots: `reset` a slot before a new sequence."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
        self._ngrams: dict[int, NGramBlocker] = {}

    def reset(self, slot: int, params: SamplingParams) -> None:
        self.seen[slot] = False
        self._ngrams.pop(slot, None)
        if params.penalizes and params.repetition_ngram_size > 1:
            self._ngrams[slot] = NGramBlocker(params.repetition_ngram_size)

    def forget(self, slot: int) -> None:
        self._ngrams.pop(slot, None)

    def push(self, slots: Sequence[int], tokens: Sequence[int]) -> None:
        """Record one generated byte per slot: host lists, so nothing is read from the device."""
        index = torch.tensor([list(slots), list(tokens)], device=self.seen.device)  # (2, A)
        self.seen[index[0], index[1]] = True
        if self._ngrams:
            for slot, token in zip(slots, tokens, strict=True):
                if (blocker := self._ngrams.get(slot)) is not None:
                    blocker.push(token)

    def repeated(self, slots: Sequence[int]) -> Tensor:
        """(A, V) bool: the bytes each slot's penalty applies to now (two indexed writes for
        the rows with n-gram penalties, whatever their number)."""
        mask = self.seen[torch.tensor(list(slots), device=self.seen.device)]  # (A, V), a copy
        if self._ngrams:
            rows = [i for i, slot in enumerate(slots) if slot in self._ngrams]
            if rows:
                mask[torch.tensor(rows, device=mask.device)] = False
                followers = [(i, t) for i in rows for t in self._ngrams[slots[i]].banned()]
                if followers:
                    index = torch.tensor(followers, device=mask.device).T  # (2, N)
                    mask[index[0], index[1]] = True
        return mask


@dataclass(frozen=True)
class GenerationResult:
    """One finished sequence."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    mean_logprob: float


@torch.no_grad()
def generate(
    model: RET,
    embeddings: Tensor,
    params: Sequence[SamplingParams],
    *,
    use_cache: bool = True,
    tokenizer: Tokenizer = BYTES,
) -> list[GenerationResult]:
    """Generate one sequence per embedding row (B, E), row i sampled with params[i]; the
    model's `tokenizer` turns its tokens into text (a checkpoint's `LoadedModel.tokenizer`).

    Each row stops on its own and finished rows drop out of the batch. use_cache=True decodes
    with a KVCache and model.step; use_cache=False re-runs model.forward over the whole prefix at
    every step (the reference path).
    """
    config = model.config
    B = embeddings.shape[0]
    if len(params) != B:
        raise ValueError(f"got {B} embeddings but {len(params)} SamplingParams")
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"the model has {config.vocab_size} tokens but the tokenizer {tokenizer.vocab_size}: "
            "pass the checkpoint's tokenizer"
        )
    for p in params:
        if p.max_new_tokens > config.max_length:
            raise ValueError(
                f"max_new_tokens {p.max_new_tokens} exceeds the model's max_length "
                f"{config.max_length}"
            )
    weight = model.wte.weight
    device, dtype = weight.device, weight.dtype
    embeddings = embeddings.to(device=device, dtype=dtype)
    sampler = Sampler()
    buffers = [OutputBuffer(p, eos_id=config.eos_id, tokenizer=tokenizer) for p in params]
    blockers = [NGramBlocker(n) if (n := p.no_repeat_ngram_size) else None for p in params]
    tracker = None
    if any(p.penalizes for p in params):
        tracker = RepetitionTracker(B, config.vocab_size, device)
        for i, p in enumerate(params):
            tracker.reset(i, p)
    horizon = max((p.max_new_tokens for p in params), default=0)
    generated = torch.zeros(B, horizon, dtype=torch.long, device=device)  # (B, horizon)

    if use_cache:
        cond = model.condition(embeddings)  # (B, C)
        cache = KVCache(config, num_slots=B, device=device, dtype=dtype)

    for t in range(horizon):
        active = [i for i, buf in enumerate(buffers) if not buf.finished]
        if not active:
            break
        rows = torch.tensor(active, device=device)
        if use_cache:
            previous = generated[rows, t - 1] if t > 0 else torch.zeros_like(rows)
            positions = torch.full_like(rows, t)
            # length and span known here: attention reads nothing back from the device
            logits = model.step(cond[rows], previous, positions, cache, rows, t + 1, active[-1] + 1)
        else:
            logits = model(embeddings[rows], generated[rows, :t])[:, -1]  # (A, V)
        tokens, logprobs = sampler(
            logits,
            [params[i] for i in active],
            t,  # every active row has generated t tokens: its draw counter
            [blocker.banned() if (blocker := blockers[i]) else () for i in active],
            None if tracker is None else tracker.repeated(active),
        )
        token_list = tokens.tolist()
        if -1 in token_list:
            row = active[token_list.index(-1)]
            raise ValueError(
                f"row {row} cannot be sampled at step {t}: its logits are NaN or every token "
                "is banned"
            )
        generated[rows, t] = tokens
        if tracker is not None:
            tracker.push(active, token_list)
        for i, token, logprob in zip(active, token_list, logprobs.tolist(), strict=True):
            buffers[i].append(token, logprob)
            if (blocker := blockers[i]) is not None:
                blocker.push(token)

    return [
        GenerationResult(
            token_ids=list(buf.token_ids),
            text=buf.text(),
            finish_reason=buf.finish_reason,  # type: ignore[arg-type]  # always set by now
            mean_logprob=buf.mean_logprob,
        )
        for buf in buffers
    ]
