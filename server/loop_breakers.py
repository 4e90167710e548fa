"""What a RET engine keeps of its running sequences' loop breakers (no-repeat n-grams and the
repetition penalty; server/ret_engine.py), worker thread only.

With the C++ step on the CPU, each slot's generated tokens (its token history, which the step
writes) are the one record: the step reads it for a batch it decodes several steps a call,
and `masks` reads it (in C++) for a batch sampled in Python. Without one (the eager step, a
GPU), a no-repeat blocker and a repetition tracker are fed each row's token a step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from retd.model.cpp_step import load_extension
from retd.model.generation import NGramBlocker, RepetitionTracker, SamplingParams
from retd.model.model import RETConfig
from retd.model.sampling import Banned
from retd.server.scheduler import Row


class LoopBreakers:
    def __init__(self, slots: int, config: RETConfig, device: torch.device, history: bool) -> None:
        """`history`: keep each slot's token history (the C++ step's, on the CPU) rather than
        blockers and trackers."""
        self.history = torch.zeros(slots, config.max_length, dtype=torch.long) if history else None
        self._vocab_size = config.vocab_size
        self._blockers: dict[int, NGramBlocker] = {}  # seq_id -> its no-repeat n-grams
        self._repeats = RepetitionTracker(slots, config.vocab_size, device)
        self._penalized: set[int] = set()  # seq_ids whose repetition penalty is on

    def register(self, seq_id: int, params: SamplingParams) -> None:
        """A sequence's first step: what its breakers need kept."""
        if params.no_repeat_ngram_size and self.history is None:
            self._blockers[seq_id] = NGramBlocker(params.no_repeat_ngram_size)
        if params.penalizes:
            self._penalized.add(seq_id)

    def track(
        self,
        rows: Sequence[Row],
        joining: Mapping[int, object],
        params: Mapping[int, SamplingParams],
    ) -> None:
        """Without a token history: feed each row's last token to its blocker and tracker
        (a joiner's slot forgets what its last sequence left)."""
        if self.history is not None:
            return  # the C++ step writes each row's last token to the history
        pushed: list[Row] = []
        for row in rows:  # each row's last byte, seen once per step
            if row.seq_id in joining:
                if row.seq_id in self._penalized:
                    self._repeats.reset(row.slot, params[row.seq_id])
                else:
                    self._repeats.forget(row.slot)
            if row.position == 0 or row.padding:
                continue
            blocker = self._blockers.get(row.seq_id)
            if blocker is not None:
                blocker.push(row.token)
            if row.seq_id in self._penalized:
                pushed.append(row)
        if pushed:
            self._repeats.push([r.slot for r in pushed], [r.token for r in pushed])

    def masks(
        self, rows: Sequence[Row], params: Sequence[SamplingParams]
    ) -> tuple[Banned, torch.Tensor | None]:
        """Each row's banned tokens (no-repeat n-grams) and the (A, V) mask of those its
        repetition penalty applies to (None when no row has one), for `sample_batch`."""
        penalize = [r.seq_id in self._penalized for r in rows]
        if self.history is None:
            banned = [b.banned() if (b := self._blockers.get(r.seq_id)) else () for r in rows]
            repeated = self._repeats.repeated([r.slot for r in rows]) if any(penalize) else None
            return banned, repeated
        if not any(penalize) and not any(p.no_repeat_ngram_size for p in params):
            return [()] * len(rows), None
        repeated, banned = load_extension().loop_breaker_masks(
            self.history,
            torch.tensor([r.slot for r in rows]),
            torch.tensor([r.position for r in rows]),
            torch.tensor(penalize),
            torch.tensor([p.repetition_ngram_size for p in params]),
            torch.tensor([p.no_repeat_ngram_size for p in params]),
            self._vocab_size,
        )
        return banned, repeated if any(penalize) else None

    def forget(self, seq_id: int) -> None:
        self._blockers.pop(seq_id, None)
        self._penalized.discard(seq_id)

    def clear(self) -> None:
        self._blockers.clear()
        self._penalized.clear()
