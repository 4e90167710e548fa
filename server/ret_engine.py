"""The RET engine: continuous batching of RET's decode steps over KV-cache slots, each step
run so that one bad row (or an out-of-memory batch) fails only itself: a failing forward pass
is bisected until the rows that fail are found, a failing draw is retried row by row.

The generic worker loop it plugs into is `Engine`'s (server/engine.py).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from retd.model.checkpoint import (
    RET_KIND,
    LoadedModel,
    load_checkpoint,
    parse_dtype,
    resolve_device,
)
from retd.model.cpp_step import (
    CppStep,
    Draft,
    RowControls,
    StepFunction,
    step_function,
    step_name,
)
from retd.model.decoding import CANNOT_DRAW
from retd.model.generation import SamplingParams
from retd.model.model import KVCache
from retd.model.sampling import Sampler
from retd.server.config import ModelSpec
from retd.server.engine import Engine, ModelDescription, SequenceRequest
from retd.server.handles import Event, SequenceResult, TokenDelta
from retd.server.loop_breakers import LoopBreakers
from retd.server.memory import MemorySample, sample_memory
from retd.server.scheduler import Delta, Finished, Joiner, Row, SchedulerConfig, Step
from retd.server.validation import RETRequests

log = logging.getLogger(__name__)


class RETEngine(RETRequests, Engine):
    """Serves a RET model: continuous batching of decode steps over KV-cache slots."""

    kind = RET_KIND
    params_type = SamplingParams

    def __init__(
        self,
        name: str,
        loaded: LoadedModel,
        scheduler_config: SchedulerConfig | None = None,
        step: StepFunction | None = None,
        draft: Draft | None = None,
    ) -> None:
        """`step` runs the model's decode steps (model/cpp_step.py); by default the eager
        `RET.step`. `draft`: speculate on greedy rows' n-gram drafts where the C++ prefix
        step decodes several steps a call (the same tokens either way)."""
        parameter = next(loaded.model.parameters())
        config = loaded.config
        description = ModelDescription(
            architecture=loaded.architecture,
            version=loaded.version,
            card=loaded.card,
            sha256=loaded.sha256,
            trained=loaded.trained,
            encoder=str(loaded.card.get("encoder", {}).get("name", "")),
            embedding_dim=config.embedding_dim,
            vocab_size=config.vocab_size,
            max_length=config.max_length,
            parameter_count=sum(p.numel() for p in loaded.model.parameters()),  # tied once
        )
        super().__init__(
            name,
            description,
            parameter.device,
            parameter.dtype,
            scheduler_config,
            config.eos_id,
            loaded.tokenizer,
        )
        self.loaded = loaded
        self._step = step or loaded.model.step
        slots = self.scheduler_config.max_batch_size
        self._cache = KVCache(config, slots, self.device, self.dtype)
        self._cond = torch.zeros(slots, config.n_embd, device=self.device, dtype=self.dtype)
        # Worker thread only: the sampling tensors of the last step's rows. A sampled row's
        # draws hash its seed and position, so no generator state is kept per sequence.
        self._sampler = Sampler(config.eos_id)
        # Worker thread only: each running sequence's params, from the step it joins.
        self._params: dict[int, SamplingParams] = {}
        # Worker thread only: the running sequences' loop breakers. With the C++ step on the
        # CPU they read each slot's token history (which the step writes), and a batch whose
        # rows that step can draw runs several steps in one call (`_decode`).
        step = self._step
        on_cpu = self.device.type == "cpu"
        self._decoder = step if isinstance(step, CppStep) and on_cpu else None
        self._draft = draft
        self._breakers = LoopBreakers(slots, config, self.device, history=self._decoder is not None)

    def warm_up(self, steps: int = 4) -> None:
        """Run a few decode steps so the first caller pays no start-up cost; call it before
        `start()`."""
        config = self.loaded.config
        params = SamplingParams(max_new_tokens=steps)
        request = SequenceRequest(np.zeros(config.embedding_dim, dtype=np.float32), params)
        for position in range(steps):
            new = (Joiner(-1, request),) if position == 0 else ()
            step = Step((Row(-1, 0, position, 0),), new, ())
            _, _, failures = self._execute_isolating_faults(step, self._register(new))
            if failures:
                raise RuntimeError(f"model {self.name}: warm-up failed: {failures[-1]}")
        self._params.clear()
        self._breakers.clear()

    def _run_step(self, step: Step) -> tuple[list[tuple[list[int], list[float]]], dict[int, str]]:
        """One step's tokens and log-probabilities, or, with the C++ step on the CPU, up to
        `step.steps` steps' in one call (the same tokens as a step at a time)."""
        joining = self._register(step.new)
        if self._decoder is not None and not any(r.padding for r in step.rows):
            try:
                return self._decode(step, joining)
            except Exception as exc:  # run it a step at a time, which isolates the rows at fault
                log.warning(
                    "model %s: a call of %d rows failed (%r)", self.name, len(step.rows), exc
                )
        tokens, logprobs, failures = self._execute_isolating_faults(step, joining)
        return [(tokens, logprobs)], failures

    def _decode(
        self, step: Step, joining: Mapping[int, SequenceRequest]
    ) -> tuple[list[tuple[list[int], list[float]]], dict[int, str]]:
        """Up to `step.steps` steps in one C++ call, no row past the cache's end. A sampled
        row that cannot draw fails (its tokens of this call are dropped)."""
        history = self._breakers.history
        assert self._decoder is not None and history is not None
        rows = step.rows
        steps = min(step.steps, self.loaded.config.max_length - max(r.position for r in rows))
        slots = torch.tensor([r.slot for r in rows])
        embeddings, joined_slots = _joiners(rows, joining) or (None, None)
        params = [self._params[r.seq_id] for r in rows]
        controls = RowControls.of(params, self._eos_id, self.loaded.config.vocab_size)
        uniforms = torch.rand(steps, len(rows)) if controls.needs_uniforms else None
        room = None
        if self._draft is not None:
            room = torch.tensor([_draft_room(p, r) for p, r in zip(params, rows, strict=True)])
        tokens, logprobs = self._decoder.decode(
            self._decoder.condition_rows(self._cond, slots, embeddings, joined_slots),
            torch.tensor([r.token for r in rows]),
            torch.tensor([r.position for r in rows]),
            self._cache,
            slots,
            max(r.slot for r in rows) + 1,
            history,
            controls,
            steps,
            uniforms,
            self._draft,
            room,
        )
        # read as lists: a torch op here would hand the GIL to the event loop and wait for it
        token_lists, logprob_lists = tokens.tolist(), logprobs.tolist()  # (T, B) each
        if not any(CANNOT_DRAW in at_step for at_step in token_lists):
            return list(zip(token_lists, logprob_lists, strict=True)), {}
        failed = {b for at_step in token_lists for b, t in enumerate(at_step) if t == CANNOT_DRAW}
        message = "sampling failed: no token can be drawn (NaN logits or every token banned)"
        failures = {rows[b].seq_id: message for b in failed}
        kept = [b for b in range(len(rows)) if b not in failed]
        outcome = [
            ([toks[b] for b in kept], [lps[b] for b in kept])
            for toks, lps in zip(token_lists, logprob_lists, strict=True)
        ]
        return outcome, failures

    def _apply(
        self,
        step: Step,
        outcome: list[tuple[list[int], list[float]]] | None,
        now: float,
    ) -> list[tuple[int, Event]]:
        events: list[tuple[int, Event]] = []
        memory = None
        for done in self._scheduler.update_steps(step, outcome or [([], [])], now):
            if isinstance(done, Delta):
                events.append((done.seq_id, TokenDelta(done.text, (done.token,))))
            else:
                memory = memory or sample_memory(self.device)  # once per step at most
                events.append((done.seq_id, self._result(done, memory)))
        return events

    def _execute_isolating_faults(
        self, step: Step, joining: Mapping[int, SequenceRequest]
    ) -> tuple[list[int], list[float], dict[int, str]]:
        """Run the step: a token and its log-probability for every row that did not fail,
        and the failed rows' messages, so one bad sequence (or an out-of-memory batch)
        never fails the rest. A padding row is computed, not sampled (its token is 0).
        `joining`: the requests of the sequences whose first step this is (`_register`)."""
        self._breakers.track(step.rows, joining, self._params)
        rows, logits, failures = self._forward_isolating_faults(step.rows, joining)
        live = [i for i, r in enumerate(rows) if not r.padding]
        if len(live) < len(rows):
            logits = logits[live]
        draws = iter(self._sample([rows[i] for i in live], logits, failures))
        tokens: list[int] = []
        logprobs: list[float] = []
        for row in rows:
            token, logprob = (0, 0.0) if row.padding else next(draws)
            if token >= 0:
                tokens.append(token)
                logprobs.append(logprob)
            elif row.seq_id not in failures:
                failures[row.seq_id] = (
                    "sampling failed: no token can be drawn (NaN logits or every token banned)"
                )
        return tokens, logprobs, failures

    def _register(self, new: Sequence[Joiner]) -> dict[int, SequenceRequest]:
        """Keep what the worker needs of each joiner (it comes with its first step only):
        its params, and its loop breakers' trackers. Returns the joiners' requests by id."""
        joining: dict[int, SequenceRequest] = {}
        for joiner in new:
            request = joiner.request
            params = request.params
            assert isinstance(params, SamplingParams), "a RET sequence is sampled"
            joining[joiner.seq_id] = request
            self._params[joiner.seq_id] = params
            self._breakers.register(joiner.seq_id, params)
        return joining

    def _sample(
        self, rows: list[Row], logits: torch.Tensor, failures: dict[int, str]
    ) -> list[tuple[int, float]]:
        """Each row's token and its log-probability (-1 when it cannot be drawn; a failure
        adds its message to `failures`)."""
        if not rows:
            return []
        params = [self._params[r.seq_id] for r in rows]
        positions = [r.position for r in rows]  # each row's draw counter
        banned, repeated = self._breakers.masks(rows, params)
        try:
            sampled, logprob_tensor = self._sampler(logits, params, positions, banned, repeated)
            return list(zip(sampled.tolist(), logprob_tensor.tolist(), strict=True))
        except Exception as exc:  # draws depend on (seed, position) only: retry row by row
            log.warning(
                "model %s: sampling %d rows failed (%r); row by row", self.name, len(rows), exc
            )
        drawn: list[tuple[int, float]] = []
        for i, row in enumerate(rows):
            try:
                token, logprob = self._sampler(
                    logits[i : i + 1],
                    params[i : i + 1],
                    positions[i : i + 1],
                    banned[i : i + 1],
                    None if repeated is None else repeated[i : i + 1],
                )
                drawn.append((int(token[0]), float(logprob[0])))
            except Exception as row_exc:
                failures[row.seq_id] = f"sampling failed: {row_exc}"
                drawn.append((-1, float("nan")))
        return drawn

    def _forward_isolating_faults(
        self, rows: tuple[Row, ...], joining: Mapping[int, SequenceRequest]
    ) -> tuple[tuple[Row, ...], torch.Tensor, dict[int, str]]:
        """The model's logits for `rows`; if the step raises, its halves are run to find the
        rows that fail. Returns the rows that succeeded, their logits, and the failures."""
        try:
            return rows, self._forward(rows, joining), {}
        except Exception as exc:
            if len(rows) == 1:
                log.warning("model %s: sequence %d failed: %r", self.name, rows[0].seq_id, exc)
                return (), torch.empty(0), {rows[0].seq_id: f"model step failed: {exc}"}
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            log.warning(
                "model %s: a step of %d failed (%r); retrying in halves", self.name, len(rows), exc
            )
        half = len(rows) // 2
        ok_rows: tuple[Row, ...] = ()
        parts: list[torch.Tensor] = []
        failures: dict[int, str] = {}
        for part in (rows[:half], rows[half:]):
            part_rows, logits, part_failures = self._forward_isolating_faults(part, joining)
            ok_rows += part_rows
            if part_rows:
                parts.append(logits)
            failures.update(part_failures)
        return ok_rows, torch.cat(parts) if parts else torch.empty(0), failures

    def _forward(
        self, rows: tuple[Row, ...], joining: Mapping[int, SequenceRequest]
    ) -> torch.Tensor:
        """One decode step on the model: next-byte logits (len(rows), V). `joining` holds the
        requests of the sequences whose first step this is (their input is the prefix)."""
        device = self.device
        self._condition_joiners(rows, joining)
        slots = torch.tensor([r.slot for r in rows], device=device)
        positions = torch.tensor([r.position for r in rows], device=device)
        tokens = torch.tensor([r.token for r in rows], device=device)
        length = max(r.position for r in rows) + 1
        span = max(r.slot for r in rows) + 1
        if self._decoder is not None:  # it writes each row's last token to the history
            return self._decoder(
                self._cond[slots],
                tokens,
                positions,
                self._cache,
                slots,
                length,
                span,
                history=self._breakers.history,
            )
        return self._step(self._cond[slots], tokens, positions, self._cache, slots, length, span)

    def _condition_joiners(
        self, rows: Sequence[Row], joining: Mapping[int, SequenceRequest]
    ) -> None:
        """Each joining row's conditioning vector into its slot."""
        joiners = _joiners(rows, joining)
        if joiners is not None:
            embeddings, joined_slots = joiners
            self._cond[joined_slots.to(self.device)] = self.loaded.model.condition(
                embeddings.to(self.device, self.dtype)
            )

    def _result(self, finished: Finished, memory: MemorySample) -> SequenceResult:
        state = finished.state
        output = state.output
        assert output is not None, "a RET sequence generates: it has an output buffer"
        assert output.finish_reason is not None and state.admitted_at is not None
        assert state.first_token_at is not None
        return SequenceResult(
            text=output.text(),
            token_ids=tuple(output.token_ids),
            finish_reason=output.finish_reason,
            mean_logprob=output.mean_logprob,
            seed=state.request.seed,
            queue_s=state.admitted_at - state.arrival,
            compute_s=finished.finished_at - state.admitted_at,
            tail_text=finished.tail_text,
            tail_token_ids=(output.token_ids[-1],) if state.stream else (),
            submitted_at=state.arrival,
            first_token_s=state.first_token_at - state.arrival,
            batch_min=state.batch_min,
            batch_max=state.batch_max,
            batch_mean=state.batch_mean,
            memory=memory,
        )

    def _forget(self, seq_id: int) -> None:
        self._params.pop(seq_id, None)
        self._breakers.forget(seq_id)


def _joiners(
    rows: Sequence[Row], joining: Mapping[int, SequenceRequest]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The joining rows' embeddings (J, E) and slots (J,) long, on the CPU, made without a
    torch op (none when no row joins)."""
    joined = [r for r in rows if r.seq_id in joining]
    if not joined:
        return None
    embeddings = np.stack([joining[r.seq_id].embedding for r in joined])
    return torch.from_numpy(embeddings), torch.tensor([r.slot for r in joined])


def _draft_room(params: SamplingParams, row: Row) -> int:
    """How many tokens a row's drafts may reach: those it may still take; none where its loop
    breakers push it away from what it wrote before (a no-repeat ban or a repetition
    penalty), which is what an n-gram draft guesses it writes again."""
    if params.no_repeat_ngram_size or params.penalizes:
        return 0
    return params.max_new_tokens - row.position


def load_ret_engine(spec: ModelSpec) -> RETEngine:
    """Load a RET checkpoint onto its device (not yet warmed up)."""
    settings = spec.settings
    device = resolve_device(settings.device)
    loaded = load_checkpoint(spec.checkpoint, device=device, dtype=parse_dtype(settings.dtype))
    step = step_function(loaded.model, settings.step_impl)
    draft = Draft(settings.draft_tokens, settings.draft_ngram) if settings.draft_tokens else None
    engine = RETEngine(spec.name, loaded, settings.scheduler, step, draft)
    log.info(
        "model %s loaded: %s %s, %d parameters, %s on %s, %s step%s, sha256 %s, GIL switch "
        "interval %g ms",
        spec.name,
        loaded.architecture,
        loaded.version,
        loaded.model.num_parameters(),
        settings.dtype,
        device,
        {"cpp": "C++", "prefix": "C++ prefix-attention"}.get(step_name(step), "eager"),
        f" (greedy rows guess {draft.tokens} tokens of {draft.ngram}-grams)"
        if draft and step_name(step) == "prefix"
        else "",
        loaded.sha256[:12],
        sys.getswitchinterval() * 1e3,
    )
    if not loaded.trained:
        log.warning(
            "model %s is UNTRAINED (random weights from %s): it decodes noise, not text",
            spec.name,
            spec.checkpoint,
        )
    return engine
