"""The test-only architecture `ret_faulty`: RET whose decode step raises while a marked
sequence is in the batch, so tests can prove that a failing sequence fails alone and the rest
of its batch finishes correctly. Importing this module registers it.

`python -m tests.faulty_model [flags]` is `retd serve [flags]` with it registered (the tests'
servers run in a subprocess, which must register it too)."""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from retd.model.model import RET, KVCache, RETConfig, register_architecture

ARCHITECTURE = "ret_faulty"
# An embedding whose first value is this (finite and small enough to pass validation)
# marks a sequence that FaultInjectingRET fails on.
FAULT_MARKER = 123456.0


class FaultInjectingRET(RET):
    """RET (ret_v21's shape) whose decode step raises while a marked sequence
    (embedding[0] == FAULT_MARKER) is in the batch."""

    def condition(self, embedding: Tensor) -> Tensor:
        cond = super().condition(embedding)
        marked = embedding[:, 0] == FAULT_MARKER
        return cond.masked_fill(marked[:, None], float("nan"))

    def step(
        self,
        cond: Tensor,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache,
        slots: Tensor,
        length: int | None = None,
        span: int | None = None,
    ) -> Tensor:
        if bool(torch.isnan(cond).any()):
            raise RuntimeError("injected fault: a marked sequence is in this step")
        return super().step(cond, tokens, positions, cache, slots, length, span)


register_architecture(ARCHITECTURE, RETConfig(), FaultInjectingRET)

if __name__ == "__main__":
    from retd.server.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
