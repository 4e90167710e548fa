"""`retd bench --raw`: the model alone (no gRPC, no scheduler), batches of `batch_size`
through `generate()` (a phrase bank: through its search), the ceiling a server can approach."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .report import GENERATE_FIELDS, BenchConfig, BenchReport, percentiles, token_range

if TYPE_CHECKING:
    import torch

    from retd.model.generation import SamplingParams


def _time_batches(
    one_batch: Callable[[], tuple[float, int]], config: BenchConfig
) -> tuple[list[float], int, float]:
    """Warm up, then run `one_batch` (-> its latency and bytes generated) for the duration
    or the number of requests: the latencies, the bytes, and the seconds it took."""
    warm_end = time.perf_counter() + config.warmup
    while time.perf_counter() < warm_end:
        one_batch()
    latencies: list[float] = []
    tokens = 0
    started = time.perf_counter()
    end = started + (config.duration or 10.0)
    while time.perf_counter() < end and (
        config.requests is None or len(latencies) * config.batch_size < config.requests
    ):
        latency, generated = one_batch()
        latencies.append(latency)
        tokens += generated
    return latencies, tokens, time.perf_counter() - started


def _raw_report(
    config: BenchConfig, latencies: list[float], tokens: int, seconds: float, **extra: object
) -> BenchReport:
    size = config.batch_size
    return BenchReport(
        mode="raw",
        concurrency=1,
        batch_size=size,
        new_tokens=token_range(config),
        seconds=seconds,
        requests=len(latencies),
        sequences=len(latencies) * size,
        requests_per_s=len(latencies) / seconds,
        sequences_per_s=len(latencies) * size / seconds,
        tokens_per_s=tokens / seconds,
        latency_ms=percentiles(latencies),
        short_latency_ms={},
        first_delta_ms={},
        errors={},
        raw=True,
        extra=dict(extra),
    )


def run_raw(
    checkpoint: Path,
    config: BenchConfig,
    device: str,
    dtype: str,
    threads: int = 0,
    step_impl: str = "auto",
) -> BenchReport:
    """The model alone: batches of `batch_size` through `generate()` (a phrase bank: through
    its search) for the duration, on as many torch threads as a server started with
    `--torch-threads threads` uses, its decode steps run as a server's `--step-impl` runs
    them."""
    import torch

    from retd.model.checkpoint import (
        PHRASE_BANK_KIND,
        checkpoint_kind,
        load_checkpoint,
        parse_dtype,
        resolve_device,
    )
    from retd.model.cpp_step import step_function, step_name
    from retd.model.generation import SamplingParams, generate
    from retd.server import allocator
    from retd.server.app import torch_threads

    torch.set_num_threads(torch_threads(threads))
    allocator.tune()  # as a server does: the model alone compared like for like
    if checkpoint_kind(checkpoint) == PHRASE_BANK_KIND:
        return _run_raw_phrase_bank(checkpoint, config, resolve_device(device), parse_dtype(dtype))

    loaded = load_checkpoint(checkpoint, device=resolve_device(device), dtype=parse_dtype(dtype))
    rng = np.random.default_rng(config.seed)
    param_rng = random.Random(config.seed)
    size = config.batch_size
    model_device = next(loaded.model.parameters()).device
    step = step_function(loaded.model, step_impl)

    def one_batch() -> tuple[float, int]:
        embeddings = torch.from_numpy(
            rng.standard_normal((size, config.embedding_dim)).astype(np.float32)
        ).to(model_device)
        params = [
            raw_params(
                SamplingParams,
                config.mode,
                i,
                param_rng.randint(config.min_new_tokens, config.max_new_tokens),
                param_rng.randrange(2**63),
            )
            for i in range(size)
        ]
        started = time.perf_counter()
        results = generate(loaded.model, embeddings, params, tokenizer=loaded.tokenizer, step=step)
        return time.perf_counter() - started, sum(len(r.token_ids) for r in results)

    latencies, tokens, seconds = _time_batches(one_batch, config)
    return _raw_report(
        config,
        latencies,
        tokens,
        seconds,
        torch_threads=torch.get_num_threads(),
        step_impl=step_name(step),
    )


def raw_params(
    params_class: type[SamplingParams], mode: str, row: int, max_new_tokens: int, seed: int
) -> SamplingParams:
    """Row `row` of a raw batch in `mode`: greedy for the Decode modes (and every other row of
    "mixed"), else sampled as the mode's Generate requests are (GENERATE_FIELDS; a drawn seed
    where they let the server draw one)."""
    fields = dict(GENERATE_FIELDS.get(mode, {}))
    if mode not in GENERATE_FIELDS or (mode == "mixed" and row % 2 == 0):
        return params_class(max_new_tokens=max_new_tokens)
    return params_class(
        max_new_tokens=max_new_tokens,
        temperature=fields.get("temperature", 1.0),
        top_k=fields.get("top_k", 0),
        top_p=fields.get("top_p", 1.0),
        seed=fields.get("seed", seed),
    )


def _run_raw_phrase_bank(
    checkpoint: Path, config: BenchConfig, device: torch.device, dtype: torch.dtype
) -> BenchReport:
    """A phrase bank alone: batches of `batch_size` random unit queries through its search
    (one matrix product and the top candidate per query)."""
    import torch

    from retd.model.phrase_bank import load_phrase_bank

    bank = load_phrase_bank(checkpoint, device=device, dtype=dtype).bank
    rng = np.random.default_rng(config.seed)

    def one_batch() -> tuple[float, int]:
        queries = rng.standard_normal((config.batch_size, bank.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        started = time.perf_counter()
        bank.search(torch.from_numpy(queries), 1)[1].tolist()  # .tolist(): wait for the device
        return time.perf_counter() - started, 0

    latencies, tokens, seconds = _time_batches(one_batch, config)
    return _raw_report(
        config,
        latencies,
        tokens,
        seconds,
        torch_threads=torch.get_num_threads(),
        phrases=len(bank),
        dtype=str(bank.dtype).removeprefix("torch."),
    )
