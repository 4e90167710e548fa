"""What `retd bench` measures and reports: the load's settings (`BenchConfig`), one call's
measurement (`Sample`) and a run's report (`BenchReport`), shared by the load generator and
the raw-model timer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MODES = (
    "decode", "generate", "generate_stream", "decode_batch", "decode_stream",
    "generate_default", "generate_filtered", "mixed",
)  # fmt: skip
# The sampled Generate requests of the modes that send them (besides the embedding and
# max_new_tokens): "generate_default" sets nothing else (temperature 1, a seed the server
# draws: what a caller who sets only an embedding gets), "generate_filtered" adds top-k and
# top-p; "mixed" alternates greedy Decode and "generate_default" requests on every caller.
# ("generate" and "generate_stream" send one seed for all: every request draws the same
# numbers, which correlates their texts, e.g. all or none of them end early.)
GENERATE_FIELDS: dict[str, dict[str, Any]] = {
    "generate": {"temperature": 0.8, "seed": 1},
    "generate_stream": {"temperature": 0.8, "seed": 1},
    "generate_default": {},
    "generate_filtered": {"temperature": 0.8, "top_k": 50, "top_p": 0.95},
    "mixed": {},
}
SHORT_TOKENS = 32  # requests of at most this many bytes count as "short" in the report


@dataclass(frozen=True)
class BenchConfig:
    mode: str = "decode"
    concurrency: int = 64
    requests: int | None = None
    duration: float | None = 10.0
    warmup: float = 1.0
    min_new_tokens: int = 64
    max_new_tokens: int = 64
    batch_size: int = 1
    seed: int = 0
    timeout: float = 60.0
    embedding_dim: int = 768
    model: str = ""  # empty: the server's default model


@dataclass
class Sample:
    latency: float
    tokens: int
    max_new_tokens: int
    status: str = "OK"
    first_delta: float | None = None


@dataclass
class BenchReport:
    mode: str
    concurrency: int
    batch_size: int
    new_tokens: str
    seconds: float
    requests: int
    sequences: int
    requests_per_s: float
    sequences_per_s: float
    tokens_per_s: float
    latency_ms: dict[str, float]
    short_latency_ms: dict[str, float]
    first_delta_ms: dict[str, float]
    errors: dict[str, int]
    server_args: str = ""
    raw: bool = False
    extra: dict[str, object] = field(default_factory=dict)

    def render(self) -> str:
        lines = [
            f"mode {self.mode}  callers {self.concurrency}  batch {self.batch_size}  "
            f"new tokens {self.new_tokens}  {self.server_args or ''}".rstrip(),
            f"  {self.requests} requests in {self.seconds:.2f}s: {self.requests_per_s:.1f} req/s, "
            f"{self.sequences_per_s:.1f} seq/s, {self.tokens_per_s:.0f} tokens/s",
        ]
        if self.latency_ms:
            lines.append("  latency ms  " + _render_percentiles(self.latency_ms))
        if self.short_latency_ms:
            lines.append(
                f"  short (<= {SHORT_TOKENS} bytes) ms  "
                + _render_percentiles(self.short_latency_ms)
            )
        if self.first_delta_ms:
            lines.append("  first delta ms  " + _render_percentiles(self.first_delta_ms))
        if self.extra.get("server_rss_mib_before") is not None:
            replicas = self.extra.get("replicas")
            lines.append(
                f"  server RSS MiB{f' ({replicas} replicas, summed)' if replicas else ''}  "
                f"before {self.extra['server_rss_mib_before']:.1f}  "
                f"after {self.extra['server_rss_mib_after']:.1f}"
            )
        lines.append("  errors  " + (", ".join(f"{k}: {v}" for k, v in self.errors.items()) or "0"))
        return "\n".join(lines)


def _render_percentiles(values: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.1f}" for k, v in values.items())


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values) * 1e3
    return {f"p{q}": float(np.percentile(array, q)) for q in (50, 90, 99)}


def token_range(config: BenchConfig) -> str:
    if config.min_new_tokens == config.max_new_tokens:
        return str(config.max_new_tokens)
    return f"{config.min_new_tokens}..{config.max_new_tokens}"
