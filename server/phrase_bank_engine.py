"""The engine of a phrase bank: the scheduler batches waiting queries exactly as it batches
RET's sequences (bounded queue, priorities, deadlines, cancellation, `max_wait_ms`), and the
worker answers a whole step with one search: the step's embeddings in one matrix product
against the bank, `torch.topk` for each row's nearest phrases. Every sequence ends in the
step it joins (`Scheduler.complete`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from retd.model.checkpoint import PHRASE_BANK_KIND
from retd.model.generation import FinishReason, SamplingParams
from retd.model.phrase_bank import LoadedPhraseBank
from retd.server.config import DecodeDefaults
from retd.server.engine import (
    Candidate,
    Engine,
    Event,
    MemorySample,
    ModelDescription,
    SequenceRequest,
    SequenceResult,
    TokenDelta,
    sample_memory,
)
from retd.server.scheduler import Finished, Row, SchedulerConfig, Step
from retd.server.validation import DecodeOptions, loop_breakers, parse_bank_generate, parse_query
from retd.v1 import decoder_pb2 as pb

log = logging.getLogger(__name__)

# A phrase bank's sequences: one step, no token generated.
BANK_PARAMS = SamplingParams(max_new_tokens=1)


class PhraseBankEngine(Engine):
    """Serves a phrase bank: a step's queries are searched together, exactly."""

    kind = PHRASE_BANK_KIND

    def __init__(
        self,
        name: str,
        loaded: LoadedPhraseBank,
        scheduler_config: SchedulerConfig | None = None,
    ) -> None:
        bank = loaded.bank
        description = ModelDescription(
            architecture=PHRASE_BANK_KIND,
            version=loaded.version,
            card=loaded.card,
            sha256=loaded.sha256,
            trained=True,  # its answers are real phrases, never noise
            encoder=loaded.encoder,
            embedding_dim=bank.dim,
            vocab_size=0,
            max_length=bank.max_bytes,
            parameter_count=len(bank) * bank.dim,
            phrase_count=len(bank),
        )
        matrix = bank.embeddings
        super().__init__(name, description, matrix.device, matrix.dtype, scheduler_config)
        self.loaded = loaded

    def build_request(
        self,
        embedding: pb.Embedding,
        field: str,
        options: DecodeOptions,
        defaults: DecodeDefaults,
        deadline: float | None,
        max_new_tokens_limit: int = 0,
    ) -> SequenceRequest:
        """The nearest phrase, whole: max_new_tokens and the loop breakers do not apply to
        it (the latter are checked all the same)."""
        query = parse_query(embedding, field, self.limits(max_new_tokens_limit))
        loop_breakers(options, defaults)
        return SequenceRequest(query, BANK_PARAMS, 0, deadline=deadline, priority=options.priority)

    def build_generate_request(
        self,
        request: pb.GenerateRequest,
        stream: bool,
        deadline: float | None,
        max_new_tokens_limit: int = 0,
    ) -> SequenceRequest:
        """The top_k nearest phrases, as candidates."""
        query = parse_query(request.embedding, "embedding", self.limits(max_new_tokens_limit))
        candidates, seed = parse_bank_generate(request)
        return SequenceRequest(
            query,
            BANK_PARAMS,
            seed,
            stream=stream,
            deadline=deadline,
            priority=request.priority,
            candidates=candidates,
        )

    def warm_up(self) -> None:
        """One search at the largest batch, so the first callers pay no start-up cost."""
        queries = torch.ones(self.scheduler_config.max_batch_size, self.description.embedding_dim)
        with torch.no_grad():
            self.loaded.bank.search(queries, 1)

    def _run_step(
        self, step: Step, requests: Mapping[int, SequenceRequest]
    ) -> tuple[dict[int, tuple[Candidate, ...]], dict[int, str]]:
        return self._search_isolating_faults(step.rows, requests)

    def _apply(
        self,
        step: Step,
        requests: Mapping[int, SequenceRequest],
        outcome: dict[int, tuple[Candidate, ...]] | None,
        now: float,
    ) -> list[tuple[int, Event]]:
        matches = outcome or {}
        events: list[tuple[int, Event]] = []
        finished = self._scheduler.complete(step, now)
        memory = sample_memory(self.device) if finished else None
        for done in finished:
            candidates = matches[done.seq_id]
            if requests[done.seq_id].stream:  # the whole phrase as one delta
                events.append((done.seq_id, TokenDelta(candidates[0].text, ())))
            events.append(
                (done.seq_id, self._result(done, requests[done.seq_id], candidates, memory))
            )
        return events

    def _search_isolating_faults(
        self, rows: Sequence[Row], requests: Mapping[int, SequenceRequest]
    ) -> tuple[dict[int, tuple[Candidate, ...]], dict[int, str]]:
        """Every row's candidates from one search; if it raises (out of memory, say), row by
        row, so that only the rows that fail get an error."""
        try:
            return self._search(rows, requests), {}
        except Exception as exc:
            if len(rows) == 1:
                log.warning("model %s: search failed: %r", self.name, exc)
                return {}, {rows[0].seq_id: f"search failed: {exc}"}
            log.warning(
                "model %s: a search of %d failed (%r); row by row", self.name, len(rows), exc
            )
        matches: dict[int, tuple[Candidate, ...]] = {}
        failures: dict[int, str] = {}
        for row in rows:
            row_matches, row_failures = self._search_isolating_faults((row,), requests)
            matches.update(row_matches)
            failures.update(row_failures)
        return matches, failures

    def _search(
        self, rows: Sequence[Row], requests: Mapping[int, SequenceRequest]
    ) -> dict[int, tuple[Candidate, ...]]:
        bank = self.loaded.bank
        queries = torch.from_numpy(np.stack([requests[r.seq_id].embedding for r in rows]))
        k = max(requests[r.seq_id].candidates for r in rows)
        scores, indices = bank.search(queries, k)
        matches = {}
        for row, row_scores, row_indices in zip(
            rows, scores.tolist(), indices.tolist(), strict=True
        ):
            wanted = requests[row.seq_id].candidates
            matches[row.seq_id] = tuple(
                Candidate(bank.phrases[index], score, index)
                for score, index in zip(row_scores[:wanted], row_indices[:wanted], strict=True)
            )
        return matches

    def _result(
        self,
        finished: Finished,
        request: SequenceRequest,
        candidates: tuple[Candidate, ...],
        memory: MemorySample | None,
    ) -> SequenceResult:
        state = finished.state
        assert state.admitted_at is not None
        return SequenceResult(
            text=candidates[0].text,
            token_ids=(),
            finish_reason=FinishReason.EOS,  # a phrase is always whole
            mean_logprob=0.0,
            seed=request.seed,
            queue_s=state.admitted_at - state.arrival,
            compute_s=finished.finished_at - state.admitted_at,
            submitted_at=state.arrival,
            first_token_s=finished.finished_at - state.arrival,
            batch_min=state.batch_min,
            batch_max=state.batch_max,
            batch_mean=state.batch_mean,
            memory=memory,
            candidates=candidates,
        )
