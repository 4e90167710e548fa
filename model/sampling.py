"""Batched sampling: one token per row of a (B, V) batch of logits in a fixed number of tensor
ops, whatever B and however the rows' parameters differ.

    logits (B, V) -> EOS bias -> repetition penalty -> no-repeat bans (one masked write)
      greedy rows:  argmax
      sampled rows: (logits - max) / temperature -> [top-k -> top-p on the sorted values]
                    -> softmax -> cdf -> inverse-CDF draw with u in [0, 1)

Per-row parameters become tensors once per batch composition (`SamplingBatch`; a `Sampler`
keeps the last one while the same rows come back step after step).

Randomness is counter-based: a seeded row's u at step t is a hash of (seed, t) (splitmix64 in
int64 tensor ops for all seeded rows at once), so it depends on nothing else: the same seed gives
the same text alone or in any batch, no generator state is carried between steps, and a step
sampled again (a retry after a fault) draws the same tokens. Unseeded rows draw u from one
`torch.rand` per step.

A sampled row that cannot draw (NaN logits, or every token banned) gets token -1 and a NaN
logprob rather than an exception, so one bad row never costs its batch-mates their step and
nothing is read back from the device here; callers fail such rows. A greedy row always takes
its argmax (an all-banned row: token 0, as argmax of all -inf gives).

Shapes: B rows, V vocab_size.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .generation import SamplingParams

_MASK64 = (1 << 64) - 1
# The tokens each row may not pick: a collection per row, or a (B, V) bool mask.
Banned = Sequence[Collection[int]] | Tensor

_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: 2**64 / the golden ratio
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_U_BITS = 24  # float32's mantissa: u = k / 2**24 is exact


def _int64(value: int) -> int:
    """A 64-bit pattern as the signed int64 with the same bits (tensors hold int64)."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def splitmix64(value: int) -> int:
    """splitmix64's finaliser on a 64-bit int (pure Python, exact): the reference for
    `_mix` and the hash of a row's seed into its key."""
    z = value & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _shr(z: Tensor, shift: int) -> Tensor:
    """Logical right shift of int64 bit patterns (>> on int64 tensors is arithmetic)."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _mix(z: Tensor) -> Tensor:
    """`splitmix64` on int64 tensors: products wrap modulo 2**64 as the bit patterns need."""
    z = (z ^ _shr(z, 30)) * _int64(_MIX1)
    z = (z ^ _shr(z, 27)) * _int64(_MIX2)
    return z ^ _shr(z, 31)


def counter_uniforms(keys: Tensor, steps: Tensor) -> Tensor:
    """u in [0, 1) (float32, 24 random bits) for each row: a hash of its key (B,) int64 and its
    draw counter steps (B,) int64, nothing else."""
    z = _mix(keys + steps * _int64(_GOLDEN))  # (B,)
    return _shr(z, 64 - _U_BITS).to(torch.float32) * 2.0**-_U_BITS


def seed_key(seed: int) -> int:
    """A row's hash key (int64) from its seed (an int in [0, 2**64))."""
    return _int64(splitmix64(seed))


def apply_repetition_penalty(
    logits: Tensor, params: Sequence[SamplingParams], repeated: Tensor
) -> Tensor:
    """logits (B, V) with each row's repetition penalty applied to its `repeated` (B, V) bool
    entries, CTRL-style: divided by the penalty where positive, multiplied where negative.
    One tensor operation for the whole batch; rows whose penalty is 1 are unchanged."""
    if not any(p.penalizes for p in params):
        return logits
    penalty = torch.tensor(
        [float(p.repetition_penalty) for p in params], dtype=logits.dtype, device=logits.device
    )[:, None]
    return _penalize(logits, penalty, repeated)


def _penalize(logits: Tensor, penalty: Tensor, repeated: Tensor) -> Tensor:
    """logits (B, V), penalty (B, 1), repeated (B, V) bool -> penalized logits (B, V)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(repeated.to(logits.device, torch.bool), penalized, logits)


def filter_sorted(sorted_logits: Tensor, kth_index: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Top-k then nucleus filtering of rows sorted in descending order (B, V): removed entries
    become -inf. kth_index (B, 1) long: top_k - 1 (V - 1 where top-k is off), None if no row
    uses it; top_p (B, 1) float: inf where nucleus filtering is off, None if no row uses it.
    Keeps a token while its logit is >= the k-th largest (ties included), then while the
    probability mass before it is < top_p."""
    if kth_index is not None:
        kth = sorted_logits.gather(1, kth_index)  # (B, 1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(-1)  # (B, V)
        mass_before = probs.cumsum(-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return sorted_logits


def _descending_values(x: Tensor) -> Tensor:
    """x (B, V) sorted along V in descending order, values only. On the CPU numpy sorts:
    torch's batched CPU sort (which also computes indices) took ~2 ms at (64, 256) here,
    numpy ~25 us; elsewhere torch sorts (fast on CUDA)."""
    if x.device.type == "cpu":
        ascending = np.sort(x.detach().numpy(), axis=-1)
        return torch.from_numpy(ascending[:, ::-1].copy())
    return x.sort(dim=-1, descending=True).values


def _filter(logits: Tensor, kth_index: Tensor | None, top_p: Tensor | None) -> Tensor:
    """`filter_sorted` for logits (B, V) in vocabulary order, with no sort indices: what
    it keeps of a row is a prefix of its sorted values, so the last kept value is a threshold.
    Tokens tied in value with it are all kept (a per-row sort kept an arbitrary part of a tie
    at the nucleus edge)."""
    descending = _descending_values(logits)  # (B, V)
    kept = filter_sorted(descending, kth_index, top_p).isfinite()  # (B, V) a prefix per row
    last = (kept.sum(-1, keepdim=True) - 1).clamp_min(0)  # (B, 1)
    threshold = descending.gather(1, last)  # (B, 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def filter_logits(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Top-k then nucleus filtering of logits (B, V) in vocabulary order, row i with top_k[i]
    (0 or >= V: off) and top_p[i] (1: off; float64 keeps a top_p that float32 rounds to 1 on):
    removed entries become -inf (`filter_sorted`)."""
    V = logits.shape[-1]
    kth_index = torch.where((top_k > 0) & (top_k < V), top_k, V) - 1
    nucleus = torch.where(top_p < 1, top_p.to(logits.dtype), float("inf"))
    return _filter(logits, kth_index[:, None], nucleus[:, None])


class SamplingBatch:
    """The sampling parameters of one batch composition (B rows) as tensors on `device`.

    Built once per composition (with continuous batching, most steps): the tensors of the
    filters a batch does not use are None, and an all-greedy batch builds none of the draw's
    (greedy, temperature, seeded, keys), so a step pays only for what its rows ask for."""

    def __init__(
        self,
        params: Sequence[SamplingParams],
        vocab_size: int,
        device: torch.device | str,
        eos_id: int = 0,
    ) -> None:
        self.params = tuple(params)
        B, V = len(self.params), vocab_size
        self.size, self.vocab_size = B, V
        self.device = torch.device(device)
        self.eos_id = eos_id
        self.eos_bias: Tensor | None = None  # (B,): each row's bias on the EOS logit
        if any(p.eos_bias for p in self.params):
            self.eos_bias = torch.tensor([float(p.eos_bias) for p in self.params], device=device)
        self.penalty: Tensor | None = None
        if any(p.penalizes for p in self.params):
            self.penalty = torch.tensor(  # (B, 1)
                [[float(p.repetition_penalty)] for p in self.params], device=device
            )
        greedy = [p.greedy for p in self.params]
        self.all_greedy = all(greedy)
        self.any_greedy = any(greedy)
        self.kth_index: Tensor | None = None
        self.top_p: Tensor | None = None
        self.all_seeded = self.any_seeded = False
        if self.all_greedy:  # the rest is what a draw reads: an all-greedy batch takes argmax
            return
        self.greedy = torch.tensor(greedy, dtype=torch.bool, device=device)  # (B,)
        sampled = [p for p in self.params if not p.greedy]
        # Greedy rows ride along the sampled ones' ops harmlessly: temperature 1, no filters.
        temperature = [1.0 if p.greedy else float(p.temperature) for p in self.params]
        # (logits - max) / t: a t that float32 rounds to 0 would make the max 0 / 0.
        self.temperature = torch.tensor(temperature, device=device)[:, None].clamp_min(
            torch.finfo(torch.float32).tiny
        )  # (B, 1)
        if any(0 < p.top_k < V for p in sampled):
            top_k = [p.top_k if not p.greedy and 0 < p.top_k < V else V for p in self.params]
            self.kth_index = torch.tensor(top_k, device=device)[:, None] - 1  # (B, 1)
        if any(p.top_p < 1 for p in sampled):
            top_p = [p.top_p if not p.greedy and p.top_p < 1 else float("inf") for p in self.params]
            self.top_p = torch.tensor(top_p, device=device)[:, None]  # (B, 1)
        seeded = [p.seed is not None for p in self.params]
        self.all_seeded = all(seeded)
        self.any_seeded = any(seeded)
        self.seeded = torch.tensor(seeded, dtype=torch.bool, device=device)  # (B,)
        self.keys = torch.tensor(  # (B,) int64: each seeded row's hash key
            [0 if p.seed is None else seed_key(p.seed) for p in self.params],
            dtype=torch.long,
            device=device,
        )

    def matches(self, params: Sequence[SamplingParams]) -> bool:
        """Whether `params` are this batch's, the same objects in the same order."""
        return len(params) == self.size and all(map(operator.is_, params, self.params))

    def uniforms(self, steps: Tensor) -> Tensor:
        """One u in [0, 1) per row (B,) float32: seeded rows hash (key, step), the rest draw."""
        if self.all_seeded:
            return counter_uniforms(self.keys, steps)
        drawn = torch.rand(self.size, device=self.device)
        if not self.any_seeded:
            return drawn
        return torch.where(self.seeded, counter_uniforms(self.keys, steps), drawn)


def _banned_mask(logits: Tensor, banned: Banned) -> Tensor:
    """logits (B, V) with -inf at row i's banned tokens: one indexed write for the batch (or
    one masked fill, `banned` a (B, V) bool mask)."""
    if isinstance(banned, Tensor):
        return logits.masked_fill(banned.to(logits.device), float("-inf"))
    rows = [i for i, tokens in enumerate(banned) for _ in tokens]
    if not rows:
        return logits
    columns = [int(token) for tokens in banned for token in tokens]
    logits = logits.clone()
    index = torch.tensor([rows, columns], device=logits.device)  # (2, N)
    logits[index[0], index[1]] = float("-inf")
    return logits


def _draw(logits: Tensor, batch: SamplingBatch, steps: Tensor) -> Tensor:
    """One token per row (B,) long by inverse CDF on the filtered distribution; -1 for rows
    that cannot draw. Every row is computed; greedy rows' draws go unused."""
    V = logits.shape[-1]
    top = logits.amax(-1, keepdim=True)  # (B, 1)
    scaled = (logits - top) / batch.temperature  # (B, V): max 0, no overflow at small t
    if batch.kth_index is not None or batch.top_p is not None:
        scaled = _filter(scaled, batch.kth_index, batch.top_p)
    cdf = scaled.softmax(-1).cumsum(-1)  # (B, V), non-decreasing
    total = cdf[:, -1:]  # (B, 1): ~1; 0 or NaN if the row cannot draw
    # The first token whose cdf exceeds u * total: it has probability > 0 as long as
    # u * total < total, which float rounding could break, hence the cap just below total.
    below_total = torch.nextafter(total, torch.zeros_like(total))
    target = torch.minimum(batch.uniforms(steps)[:, None] * total, below_total)  # (B, 1)
    tokens = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_max(V - 1)  # (B,)
    return tokens.masked_fill(~(total[:, 0] > 0), -1)


def sample_batch(
    logits: Tensor,
    batch: SamplingBatch,
    steps: int | Sequence[int] | Tensor = 0,
    banned: Banned | None = None,
    repeated: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`sample` with the batch's parameters already as tensors."""
    B = logits.shape[0]
    if batch.size != B:
        raise ValueError(f"got {B} rows of logits for a batch of {batch.size}")
    logits = unfiltered = logits.float()  # (B, V)
    if batch.eos_bias is not None:
        logits = logits.clone()
        logits[:, batch.eos_id] += batch.eos_bias
    if repeated is not None and batch.penalty is not None:
        logits = _penalize(logits, batch.penalty, repeated)
    if banned is not None:
        logits = _banned_mask(logits, banned)
    if batch.all_greedy:  # the common case: no sampling work at all
        tokens = logits.argmax(dim=-1)
    else:
        if not isinstance(steps, Tensor):
            steps = torch.as_tensor(steps, dtype=torch.long, device=logits.device)
        steps = steps.to(logits.device, torch.long).expand(B)
        tokens = _draw(logits, batch, steps)
        if batch.any_greedy:
            tokens = torch.where(batch.greedy, logits.argmax(dim=-1), tokens)
    logprobs = F.log_softmax(unfiltered, dim=-1).gather(1, tokens.clamp_min(0)[:, None])[:, 0]
    if not batch.all_greedy:
        logprobs = logprobs.masked_fill(tokens < 0, float("nan"))
    return tokens, logprobs


def sample(
    logits: Tensor,
    params: Sequence[SamplingParams],
    steps: int | Sequence[int] | Tensor = 0,
    banned: Banned | None = None,
    repeated: Tensor | None = None,
    eos_id: int = 0,
) -> tuple[Tensor, Tensor]:
    """Pick one token per row: logits (B, V) -> tokens (B,) long, logprobs (B,) float32.

    Greedy rows take the argmax. Sampled rows apply temperature, top-k, top-p, then draw u:
    from (seed, steps[i]) for a seeded row (steps: each row's draw counter, the number of tokens
    it has generated; an int for all rows), so a row never depends on its batch-mates.
    `repeated` (B, V) bool: the tokens row i's `repetition_penalty` applies to (see
    `RepetitionTracker`); `banned[i]`: tokens row i may not pick (no-repeat n-grams; or a
    (B, V) bool mask of them); a row's `eos_bias` is added to token `eos_id`'s logit first.
    logprob is the unfiltered, unbiased, temperature-1 log-probability of the chosen token.
    A sampled row that cannot draw gets token -1 (logprob NaN).
    """
    if len(params) != logits.shape[0]:
        raise ValueError(f"got {logits.shape[0]} rows of logits and {len(params)} params")
    batch = SamplingBatch(params, logits.shape[-1], logits.device, eos_id)
    return sample_batch(logits, batch, steps, banned, repeated)


class Sampler:
    """`sample` for a batch whose rows come back step after step: the tensors of the last
    composition are kept until its rows (their `SamplingParams` objects) change. `eos_id`:
    the model's end-of-sequence token (what a row's eos_bias applies to)."""

    def __init__(self, eos_id: int = 0) -> None:
        self._batch: SamplingBatch | None = None
        self._eos_id = eos_id

    def __call__(
        self,
        logits: Tensor,
        params: Sequence[SamplingParams],
        steps: int | Sequence[int] | Tensor = 0,
        banned: Banned | None = None,
        repeated: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        batch = self._batch
        if (
            batch is None
            or not batch.matches(params)
            or batch.vocab_size != logits.shape[-1]
            or batch.device != logits.device
        ):
            if len(params) != logits.shape[0]:
                raise ValueError(f"got {logits.shape[0]} rows of logits and {len(params)} params")
            batch = self._batch = SamplingBatch(
                params, logits.shape[-1], logits.device, self._eos_id
            )
        return sample_batch(logits, batch, steps, banned, repeated)
