"""An engine step reads back from the device only the tokens it sampled (and their
log-probabilities): on CUDA every other read of a tensor's values would be a sync per step."""

from __future__ import annotations

import asyncio
import contextlib
import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from retd.model.checkpoint import LoadedModel
from retd.model.generation import SamplingParams
from retd.model.sampling import Sampler
from retd.server.engine import SequenceRequest
from retd.server.ret_engine import RETEngine
from retd.server.scheduler import SchedulerConfig

# What reads a tensor's values into Python; on CUDA each waits for the device. (.numpy() is
# not here: it works on CPU tensors only, where the sampler's sort uses it and nothing waits;
# on CUDA a read must go through .cpu() or .to(), a no-op this CPU stand-in cannot see.)
READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero")


@contextlib.contextmanager
def host_reads() -> Iterator[list[tuple[str, torch.Tensor, str]]]:
    """Every read of a tensor's values while inside, from any thread (name, tensor, where):
    a CPU stand-in for torch.cuda.set_sync_debug_mode."""
    reads: list[tuple[str, torch.Tensor, str]] = []
    own = {name: torch.Tensor.__dict__.get(name) for name in READS}

    def spy(name: str) -> Any:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            reads.append((name, self, "".join(traceback.format_stack(limit=5)[:-1])))
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield reads
    finally:
        for name, original in own.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def test_the_detector_sees_a_read() -> None:
    with host_reads() as reads:
        int(torch.tensor(3))
        torch.arange(4).max().item()
    assert [name for name, *_ in reads] == ["__int__", "item"]
    assert int(torch.tensor(5)) == 5  # and leaves torch as it was


PARAMS = [
    SamplingParams(24, repetition_penalty=1.5, repetition_ngram_size=4),  # Decode's default
    SamplingParams(24, no_repeat_ngram_size=3, repetition_penalty=1.3),
    SamplingParams(24, temperature=0.9, top_k=40, top_p=0.9, seed=5),
    SamplingParams(24, temperature=1.0, seed=6, repetition_penalty=1.2),
    SamplingParams(24, temperature=0.7, seed=7, no_repeat_ngram_size=2),
]


def test_an_engine_step_reads_back_only_the_sampled_tokens(
    sharp_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampled: list[torch.Tensor] = []
    original = Sampler.__call__

    def recording(self: Sampler, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, logprobs = original(self, *args, **kwargs)
        sampled.extend((tokens, logprobs))
        return tokens, logprobs

    monkeypatch.setattr(Sampler, "__call__", recording)
    engine = RETEngine("test", sharp_model, SchedulerConfig(max_batch_size=4))

    async def main() -> list[int]:
        engine.start()
        try:
            handles = [
                engine.submit(SequenceRequest(embedding(i), p))
                for i, p in enumerate(PARAMS)  # 5 sequences on 4 slots: rows join and leave
            ]
            results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 60)
            return [len(r.token_ids) for r in results]
        finally:
            await engine.close()

    with host_reads() as reads:
        lengths = asyncio.run(main())
    assert sum(lengths) > len(PARAMS) and sampled  # real multi-step decoding
    foreign = [(name, where) for name, tensor, where in reads if not is_any(tensor, sampled)]
    assert not foreign, "".join(f"\n{name} at\n{where}" for name, where in foreign[:3])
    assert {name for name, *_ in reads} == {"tolist"}


def is_any(tensor: torch.Tensor, among: list[torch.Tensor]) -> bool:
    return any(tensor is t for t in among)


def embedding(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(768).astype(np.float32)
