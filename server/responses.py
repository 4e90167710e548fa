"""The `retd.v1.Decoder` service's responses: an engine's `SequenceResult` (and a loaded
model version) as the protobuf message a call answers with."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import struct_pb2

from retd.model.decoding import FinishReason
from retd.model.kinds import PHRASE_BANK_KIND
from retd.server.calls import status_code
from retd.server.errors import ServeError
from retd.server.handles import SequenceResult
from retd.server.versions import ModelVersion
from retd.v1 import decoder_pb2 as pb

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
}
DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


def model_info(served: ModelVersion, serving: bool) -> pb.ModelInfo:
    """A loaded version's description; `serving`: calls naming no version get it."""
    engine = served.ready_engine
    model = engine.description
    card = struct_pb2.Struct()
    card.update(_json_safe(model.card))
    stats = engine.stats()
    return pb.ModelInfo(
        name=engine.name,
        version=model.version,
        architecture=model.architecture,
        parameter_count=model.parameter_count,
        embedding_dim=model.embedding_dim,
        vocab_size=model.vocab_size,
        max_length=model.max_length,
        dtype=DTYPE_NAMES.get(str(engine.dtype), str(engine.dtype)),
        device=str(engine.device),
        checkpoint_sha256=model.sha256,
        card=card,
        trained=model.trained,
        encoder=model.encoder,
        kind=engine.kind,
        phrase_count=model.phrase_count,
        repository_version=served.version,
        serving=serving,
        load=pb.ModelLoad(
            waiting=stats.waiting,
            max_queue_size=engine.scheduler_config.max_queue_size,
            running=stats.running,
            max_batch_size=engine.scheduler_config.max_batch_size,
            batching=engine.scheduler_config.batching,
            max_wait_ms=engine.scheduler_config.max_wait_ms,
        ),
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def timing(results: Sequence[SequenceResult], received_at: float) -> pb.Timing:
    """The call's timing; with several results (a hybrid decode's), their times summed."""
    return pb.Timing(
        queue_ms=sum(r.queue_s for r in results) * 1e3,
        compute_ms=sum(r.compute_s for r in results) * 1e3,
        total_ms=(time.monotonic() - received_at) * 1e3,
    )


def _generation_summary(
    result: SequenceResult, served: ModelVersion, received_at: float
) -> dict[str, Any]:
    """The fields a GenerateResponse and a stream's last GenerateChunk share."""
    return {
        "finish_reason": FINISH_REASONS[result.finish_reason],
        "usage": pb.Usage(generated_tokens=len(result.token_ids)),
        "timing": timing([result], received_at),
        "mean_logprob": result.mean_logprob,
        "model": served.name,
        "version": served.version,
        "seed": result.seed,
        "candidates": [
            pb.Candidate(text=c.text, score=c.score, index=c.index) for c in result.candidates
        ],
    }


def generate_response(
    result: SequenceResult, served: ModelVersion, received_at: float
) -> pb.GenerateResponse:
    """A Generate's answer."""
    return pb.GenerateResponse(
        text=result.text,
        token_ids=result.token_ids,
        **_generation_summary(result, served, received_at),
    )


def last_chunk(
    result: SequenceResult, served: ModelVersion, received_at: float
) -> pb.GenerateChunk:
    """A GenerateStream's last chunk: the text not streamed yet, and the summary."""
    return pb.GenerateChunk(
        text=result.tail_text,
        token_ids=result.tail_token_ids,
        **_generation_summary(result, served, received_at),
    )


def decode_response(
    result: SequenceResult,
    served: ModelVersion,
    received_at: float,
    similarity: float | None = None,
    earlier: Sequence[SequenceResult] = (),
) -> pb.DecodeResponse:
    """`engine`'s answer. A phrase bank's carries its phrase's similarity; a generative
    model's carries `similarity` when given (hybrid decoding: the bank's best, too low), and
    the times of the `earlier` results (the bank's) count in its timing."""
    from_bank = served.kind == PHRASE_BANK_KIND
    if from_bank:
        similarity = result.candidates[0].score
    response = pb.DecodeResponse(
        text=result.text,
        finish_reason=FINISH_REASONS[result.finish_reason],
        usage=pb.Usage(generated_tokens=len(result.token_ids)),
        timing=timing([*earlier, result], received_at),
        model=served.name,
        version=served.version,
        source=answer_source(result, from_bank),
    )
    if similarity is not None:
        response.similarity = similarity
    return response


def answer_source(result: SequenceResult, from_bank: bool) -> pb.AnswerSource:
    """What produced a Decode's text: a model, a bank's phrase, or its editor's edit of one."""
    if not from_bank:
        return pb.ANSWER_SOURCE_GENERATED
    return pb.ANSWER_SOURCE_EDITED if result.candidates[0].edited else pb.ANSWER_SOURCE_PHRASE_BANK


def item_error(error: ServeError) -> pb.ItemError:
    """A batch's or a stream's failed item: its status and message."""
    code = status_code(error)
    return pb.ItemError(code=code.value[0], code_name=code.name, message=error.message)
