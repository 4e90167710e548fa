"""The engine of a phrase bank: the scheduler batches waiting queries exactly as it batches
RET's sequences (bounded queue, priorities, deadlines, cancellation, `max_wait_ms`), and the
worker answers a whole step with one search: the step's embeddings in one matrix product
against the bank, `torch.topk` for each row's nearest phrases. A search is a request with
`SearchParams` (no sampling, no token): it ends in the step it joins (`Scheduler.complete`),
so every row of a step is a joiner and its request comes with the step (`Step.new`).

A bank with an editor (model/bank_editor.py) answers a Decode (`SearchParams.edit`) by retrieve,
edit, verify: the step's edit rows search for their K nearest phrases together, the editor
rewrites them all in one batch, and each row's answer is the pick among its edits and phrases
(`retrieve_edit.Editor.answers`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from retd.model.bank_editor import editor_settings, load_editor
from retd.model.checkpoint import CARD_FILE, parse_dtype, resolve_device
from retd.model.coded_bank import CodedPhraseBank, is_coded
from retd.model.decoding import FinishReason
from retd.model.encoder import Encode
from retd.model.kinds import PHRASE_BANK_KIND
from retd.model.phrase_bank import LoadedPhraseBank, load_phrase_bank, read_bank_card
from retd.model.retrieve_edit import Editor, EditSettings
from retd.server.config import DecodeDefaults, ModelSpec
from retd.server.engine import Engine, ModelDescription, SequenceRequest
from retd.server.handles import Candidate, Event, SequenceResult, TokenDelta
from retd.server.memory import MemorySample, sample_memory
from retd.server.requests import SearchParams
from retd.server.scheduler import Finished, Joiner, SchedulerConfig, Step
from retd.server.validation import DecodeOptions, loop_breakers, parse_bank_generate, parse_query
from retd.v1 import decoder_pb2 as pb

log = logging.getLogger(__name__)


class PhraseBankEngine(Engine):
    """Serves a phrase bank: a step's queries are searched together, exactly."""

    kind = PHRASE_BANK_KIND
    params_type = SearchParams

    def __init__(
        self,
        name: str,
        loaded: LoadedPhraseBank,
        scheduler_config: SchedulerConfig | None = None,
        editor: Editor | None = None,
    ) -> None:
        """`editor`: answer Decodes by retrieve, edit, verify (the bank's card names it)."""
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
        super().__init__(name, description, bank.device, bank.dtype, scheduler_config)
        self.loaded = loaded
        self.editor = editor

    def build_request(
        self,
        embedding: pb.Embedding,
        field: str,
        options: DecodeOptions,
        defaults: DecodeDefaults,
        deadline: float | None,
        max_new_tokens_limit: int = 0,
    ) -> SequenceRequest:
        """The nearest phrase, whole, or with an editor the pick among the nearest phrases and
        their edits: max_new_tokens and the loop breakers do not apply to it (they are checked
        all the same; the edits decode with the editor's own)."""
        query = parse_query(embedding, field, self.limits(max_new_tokens_limit))
        loop_breakers(options, defaults)
        params = SearchParams(edit=self.editor is not None)
        return SequenceRequest(query, params, deadline=deadline, priority=options.priority)

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
            SearchParams(candidates, seed),
            stream=stream,
            deadline=deadline,
            priority=request.priority,
        )

    def warm_up(self) -> None:
        """One search at the largest batch, so the first callers pay no start-up cost."""
        queries = torch.ones(self.scheduler_config.max_batch_size, self.description.embedding_dim)
        with torch.no_grad():
            self.loaded.bank.search(queries, 1)
        if self.editor is not None:  # the editor's and the encoder's first call, too
            self._edit(queries[:1].numpy(), [[0] * self._edit_k()], [[1.0] * self._edit_k()])

    def _run_step(self, step: Step) -> tuple[dict[int, tuple[Candidate, ...]], dict[int, str]]:
        return self._search_isolating_faults(step.new)

    def _apply(
        self, step: Step, outcome: dict[int, tuple[Candidate, ...]] | None, now: float
    ) -> list[tuple[int, Event]]:
        matches = outcome or {}
        events: list[tuple[int, Event]] = []
        finished = self._scheduler.complete(step, now)
        memory = sample_memory(self.device) if finished else None
        for done in finished:
            candidates = matches[done.seq_id]
            if done.state.stream:  # the whole phrase as one delta
                events.append((done.seq_id, TokenDelta(candidates[0].text, ())))
            events.append((done.seq_id, self._result(done, candidates, memory)))
        return events

    def _search_isolating_faults(
        self, searches: tuple[Joiner, ...]
    ) -> tuple[dict[int, tuple[Candidate, ...]], dict[int, str]]:
        """Every search's candidates from one search of the bank; if it raises (out of
        memory, say), search by search, so that only the searches that fail get an error."""
        try:
            return self._search(searches), {}
        except Exception as exc:
            if len(searches) == 1:
                log.warning("model %s: search failed: %r", self.name, exc)
                return {}, {searches[0].seq_id: f"search failed: {exc}"}
            log.warning(
                "model %s: a search of %d failed (%r); row by row", self.name, len(searches), exc
            )
        matches: dict[int, tuple[Candidate, ...]] = {}
        failures: dict[int, str] = {}
        for search in searches:
            one_matches, one_failures = self._search_isolating_faults((search,))
            matches.update(one_matches)
            failures.update(one_failures)
        return matches, failures

    def _search(self, searches: tuple[Joiner, ...]) -> dict[int, tuple[Candidate, ...]]:
        bank = self.loaded.bank
        params = [_search_params(j) for j in searches]
        edits = [i for i, p in enumerate(params) if p.edit]
        most = max(max(p.candidates for p in params), self._edit_k() if edits else 1)
        queries = torch.from_numpy(np.stack([j.request.embedding for j in searches]))
        scores, indices = bank.search(queries, most)
        score_rows, index_rows = scores.tolist(), indices.tolist()
        matches = {}
        for i, (search, p) in enumerate(zip(searches, params, strict=True)):
            if p.edit:  # answered by the editor below
                continue
            k = p.candidates
            matches[search.seq_id] = tuple(
                Candidate(bank.phrases[index], score, index)
                for score, index in zip(score_rows[i][:k], index_rows[i][:k], strict=True)
            )
        if edits:
            k = self._edit_k()
            picks = self._edit(
                queries[edits].numpy(),
                [index_rows[i][:k] for i in edits],
                [score_rows[i][:k] for i in edits],
            )
            for i, pick in zip(edits, picks, strict=True):
                matches[searches[i].seq_id] = (pick,)
        return matches

    def _edit_k(self) -> int:
        """How many nearest phrases the editor rewrites (never more than the bank holds)."""
        assert self.editor is not None
        return min(self.editor.settings.k, len(self.loaded.bank))

    def _edit(
        self, asked: np.ndarray, rows: list[list[int]], scores: list[list[float]]
    ) -> list[Candidate]:
        """Each asked embedding's answer among its nearest phrases (`rows`, bank indices,
        with their `scores`) and the editor's edits of them."""
        assert self.editor is not None
        phrases = self.loaded.bank.phrases
        neighbours = [[phrases[i] for i in row] for row in rows]
        answers = self.editor.answers(asked, neighbours, np.asarray(scores, dtype=np.float32))
        return [
            Candidate(text, score, row[which], edited=edited)
            for (text, score, which, edited), row in zip(answers, rows, strict=True)
        ]

    def _result(
        self,
        finished: Finished,
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
            seed=state.request.seed,
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


def _search_params(joiner: Joiner) -> SearchParams:
    params = joiner.request.params
    assert isinstance(params, SearchParams), "a phrase bank's request is a search"
    return params


def _coded_bank_encoder(bank: Path, device: torch.device) -> Encode | None:
    """A coded bank's re-embedding, shared with its editor (at the editor's precision): the
    sentence encoder, loaded once; None for a bank that searches its stored embeddings."""
    if not is_coded(bank):
        return None
    card = read_bank_card(bank / CARD_FILE)
    settings = editor_settings(card, bank) or EditSettings()
    from retd.model.encoder import SentenceEncoder  # transformers: only where a bank needs it

    return SentenceEncoder.load(precision=settings.encoder, device=str(device)).encode


def load_phrase_bank_engine(spec: ModelSpec) -> PhraseBankEngine:
    """Load a phrase bank onto its device (not yet warmed up)."""
    settings = spec.settings
    device = resolve_device(settings.device)
    encode = _coded_bank_encoder(Path(spec.checkpoint), device)
    loaded = load_phrase_bank(
        spec.checkpoint, device=device, dtype=parse_dtype(settings.dtype), encode=encode
    )
    editor = load_editor(loaded.path, loaded.card, device, encode)
    bank = loaded.bank
    stored = (
        f"{bank.quantizer.m}-byte codes, {bank.rescore} re-embedded a search, on cpu"
        if isinstance(bank, CodedPhraseBank)
        else f"{settings.dtype} on {device}"
    )
    log.info(
        "model %s loaded: phrase bank %s, %d phrases x %d, %s, sha256 %s",
        spec.name,
        loaded.version,
        len(bank),
        bank.dim,
        stored,
        loaded.sha256[:12],
    )
    if editor is not None:
        edits = editor.settings
        picked = (
            f"the learnt pick ({len(edits.pick_weights)} feature weights)"
            if edits.pick_weights
            else f"cosine + {edits.consensus:g} x agreement"
        )
        log.info(
            "model %s edits its answers: %s of the %d nearest phrases (%s), picked by %s",
            spec.name,
            "PointerRET" if edits.pointer else "RET",
            edits.k,
            edits.decoder,
            picked,
        )
    return PhraseBankEngine(spec.name, loaded, settings.scheduler, editor)
