"""The TorchServe handler of `retd.server.bench.peers`: RET v2.1 through the public
`retd.model.generation.generate()`, a TorchServe batch of requests at a time.

`retd.server.bench.peers` packs this file into a model archive (torch-model-archiver
--handler torchserve_handler.py) beside the checkpoint's weights and card; TorchServe imports
it as a module of its own and calls its function `handle`, so it imports nothing of retd but
the model. A request is
TorchServe's input map: "embedding" (float32 little-endian bytes, the model's embedding
width) and "max_new_tokens" (a decimal number); the answer is JSON, {"text",
"generated_tokens", "finish_reason"}. Decoding is plain greedy (no loop breakers), as
`retd serve --decode-no-repeat-ngram-size 0 --decode-repetition-penalty 1 --decode-eos-bias 0`
decodes, and its
steps run as retd's do by default (`retd.model.cpp_step.step_function(model, "auto")`: the
C++ step where it builds), so both servers run the same step.

`RetBatchHandler` holds preprocess, inference and postprocess and needs no TorchServe (the
tests call it directly); where TorchServe is installed, `TorchServeHandler` is it on
TorchServe's `BaseHandler` (whose `handle` runs the three and times them), and `handle` is
the entry point TorchServe calls (with data None first: initialize)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retd.model.checkpoint import load_checkpoint
from retd.model.cpp_step import step_function
from retd.model.generation import GenerationResult, SamplingParams, generate

EMBEDDING = "embedding"
MAX_NEW_TOKENS = "max_new_tokens"


def _text(value: Any) -> str:
    """A TorchServe input value as text: bytes (gRPC), or already decoded (JSON, text/*)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("ascii")
    return str(value)


class RetBatchHandler:
    """preprocess -> inference -> postprocess over a batch of requests, on one torch thread."""

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.step: Any = None
        self.initialized = False

    def load(self, checkpoint: str | Path) -> None:
        torch.set_num_threads(1)
        loaded = load_checkpoint(checkpoint)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.step = step_function(self.model, "auto")
        self.initialized = True

    def initialize(self, context: Any) -> None:
        """TorchServe's: the archive's folder holds the weights and the card."""
        self.load(context.system_properties["model_dir"])

    def preprocess(
        self, requests: Sequence[Mapping[str, Any]]
    ) -> tuple[torch.Tensor, list[SamplingParams]]:
        """The batch's embeddings (B, E) and each request's greedy parameters."""
        rows = [np.frombuffer(bytes(r[EMBEDDING]), dtype="<f4") for r in requests]
        embeddings = torch.from_numpy(np.stack(rows).astype(np.float32))
        params = [SamplingParams(max_new_tokens=int(_text(r[MAX_NEW_TOKENS]))) for r in requests]
        return embeddings, params

    def inference(self, batch: tuple[torch.Tensor, list[SamplingParams]]) -> list[GenerationResult]:
        """One `generate()` call for the whole batch: it returns when its longest row ends."""
        embeddings, params = batch
        return generate(self.model, embeddings, params, tokenizer=self.tokenizer, step=self.step)

    def postprocess(self, results: Sequence[GenerationResult]) -> list[bytes]:
        return [
            json.dumps(
                {
                    "text": r.text,
                    "generated_tokens": len(r.token_ids),
                    "finish_reason": str(r.finish_reason),
                }
            ).encode()
            for r in results
        ]

    def handle_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[bytes]:
        return self.postprocess(self.inference(self.preprocess(requests)))


try:  # TorchServe's base class: in the peer benchmark's venv, not in retd's
    from ts.torch_handler.base_handler import BaseHandler
except ImportError:
    TorchServeHandler: Any = None
else:

    class TorchServeHandler(RetBatchHandler, BaseHandler):  # type: ignore[no-redef]
        """`RetBatchHandler` as TorchServe runs a handler: `BaseHandler.handle` calls its
        preprocess, inference and postprocess (and records their time)."""

        def __init__(self) -> None:
            BaseHandler.__init__(self)
            RetBatchHandler.__init__(self)


_service: Any = None


def handle(data: Any, context: Any) -> list[bytes] | None:
    """TorchServe's entry point: first called with data None (load), then with batches."""
    global _service
    if _service is None:
        if TorchServeHandler is None:
            raise RuntimeError("TorchServe (the ts package) is not installed")
        _service = TorchServeHandler()
        _service.initialize(context)
    if data is None:
        return None
    result: list[bytes] = _service.handle(data, context)
    return result
