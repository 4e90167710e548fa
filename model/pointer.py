"""PointerRET: RET that can copy tokens from the text it is given before its own (a retrieved
neighbour), with no parameter added; and the KV cache that lets it decode step by step.

    tokens = prefix (ending in EOS, the separator), then the text
    h = ln_f(RET.hidden(embedding, tokens))                       (B, T+1, C)
    vocab = h @ wte.T                                               (B, T+1, V)
    copy score of prefix row r at row t = h_t . h_r / sqrt(C)       (B, T+1, R), r < t, r <= sep
    p(token) = softmax over [vocab slots, prefix rows]: a token's vocabulary slot plus every
               prefix row holding it
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from retd.model.batches import IGNORE
from retd.model.model import RET, KVCache, RETConfig

NEVER = -1e4  # a copy score that contributes nothing (exp(NEVER) underflows to 0)


class PointerRET(RET):
    """RET that can also copy from the prefix (`--pointer`), with no parameter added.

    Row r of a prefix predicts token r (RET's rows), so its final state h_r (after ln_f)
    stands for "token r comes next". A text row t scores every prefix row r (up to and
    including the separator's row, whose token ends the text) by h_t . h_r / sqrt(C), and the
    scores join the vocabulary logits in one softmax: the probability of a token is that of
    its vocabulary slot plus that of every prefix row holding it (a pointer in the manner of
    pointer-sentinel models, keyed like kNN-LM). Without an EOS in a row nothing is copied.
    """

    @classmethod
    def of(cls, model: RET) -> PointerRET:
        """A PointerRET with `model`'s config and weights (the pointer adds none), in the
        training mode `model` is in."""
        pointer = cls(model.config)
        pointer.load_state_dict(model.state_dict())
        return pointer.train(model.training)

    def forward(self, embedding: Tensor, tokens: Tensor) -> Tensor:
        """embedding (B, E), tokens (B, T) = prefix, EOS, text -> log-probabilities (B, T+1, V)."""
        vocab, scores, values = self._pointer(embedding, tokens)
        return _join(vocab, scores, values[:, None, :].expand_as(scores))

    def loss(self, embedding: Tensor, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean negative log-likelihood of the targets (B, T+1) that are not IGNORE: the
        forward's log-probabilities at the targets, without spreading the copies over V."""
        vocab, scores, values = self._pointer(embedding, tokens)
        wanted = targets.clamp(min=0)[..., None]  # (B, T+1, 1)
        holds = values[:, None, :] == wanted  # (B, T+1, R): prefix rows holding the target
        chosen = torch.logaddexp(
            vocab.gather(-1, wanted)[..., 0], scores.masked_fill(~holds, NEVER).logsumexp(-1)
        )
        total = torch.logaddexp(vocab.logsumexp(-1), scores.logsumexp(-1))  # (B, T+1)
        scored = targets != IGNORE
        return (total - chosen)[scored].mean()

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
        """RET.step with copies: log-probabilities (B, V). With a `CopyCache` each position's
        final state is kept, and a row copies from its slot's prefix rows before `positions`
        (what `forward` gives the same row); with a plain KVCache it is RET's step."""
        h = self.ln_f(self.step_hidden(cond, tokens, positions, cache, slots, length, span))
        vocab = h @ self.wte.weight.T  # (B, V)
        if not isinstance(cache, CopyCache):
            return vocab
        cache.states[slots, positions] = h
        rows = torch.arange(cache.most_rows, device=h.device)  # (R,)
        keys = cache.states[slots, : cache.most_rows]  # (B, R, C)
        scores = (keys @ h[:, :, None])[..., 0] / math.sqrt(h.shape[-1])  # (B, R)
        valid = (rows[None] < positions[:, None]) & (rows[None] < cache.rows[slots][:, None])
        values = cache.tokens[slots, : cache.most_rows]  # (B, R)
        return _join(vocab, scores.masked_fill(~valid, NEVER), values)

    def cache(
        self,
        num_slots: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        length: int | None = None,
    ) -> KVCache:
        return CopyCache(self.config, num_slots, device, dtype, length)

    def prefill(
        self, embedding: Tensor, prefixes: Sequence[Sequence[int]], cache: KVCache
    ) -> Tensor:
        """RET.prefill, keeping the final states (after ln_f) of the prefix rows to copy."""
        h = super().prefill(embedding, prefixes, cache)  # (B, P, C)
        if isinstance(cache, CopyCache):
            cache.states[: h.shape[0], : h.shape[1]] = self.ln_f(h)
        return h

    def _pointer(self, embedding: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Vocabulary logits (B, T+1, V), copy scores (B, T+1, R) over the prefix rows (NEVER
        where a row may not copy) and the token each prefix row holds (B, R)."""
        h = self.ln_f(self.hidden(embedding, tokens))  # (B, T+1, C)
        vocab = h @ self.wte.weight.T  # (B, T+1, V)
        B, T = tokens.shape
        is_eos = torch.cat(
            (tokens == self.config.eos_id, tokens.new_ones(B, 1, dtype=torch.bool)), 1
        )
        separator = is_eos.int().argmax(1)  # (B,): the first EOS, T where there is none
        separator = separator.masked_fill(separator == T, -1)  # -1: no prefix rows
        R = max(int(separator.max()) + 1, 1)  # prefix rows, separator's included
        rows = torch.arange(R, device=tokens.device)
        causal = rows[None, :] < torch.arange(T + 1, device=tokens.device)[:, None]  # (T+1, R)
        valid = causal[None] & (rows[None, None, :] <= separator[:, None, None])  # (B, T+1, R)
        scores = (h @ h[:, :R].transpose(1, 2)) / math.sqrt(h.shape[-1])  # (B, T+1, R)
        values = torch.zeros(B, R, dtype=torch.long, device=tokens.device)
        values[:, : min(R, T)] = tokens[:, :R]
        return vocab, scores.masked_fill(~valid, NEVER), values


class CopyCache(KVCache):
    """A KVCache that also keeps each position's final state (after ln_f) and each slot's
    prefix: `states` (slots, length, C), `tokens` (slots, length) and `rows` (slots,), the
    prefix rows a slot may copy (its prefix's length, separator included; 0: none)."""

    def __init__(
        self,
        config: RETConfig,
        num_slots: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        length: int | None = None,
    ) -> None:
        super().__init__(config, num_slots, device, dtype, length)
        self.states = torch.zeros(num_slots, self.length, config.n_embd, device=device, dtype=dtype)
        self.tokens = torch.zeros(num_slots, self.length, dtype=torch.long, device=device)
        self.rows = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.most_rows = 1  # the longest prefix set, known on the host (no device read a step)

    def set_prefix(self, slot: int, tokens: Sequence[int]) -> None:
        """Up to the first EOS of `tokens` (the separator) are the rows the slot may copy."""
        eos = self.config.eos_id
        count = list(tokens).index(eos) + 1 if eos in tokens else 0
        self.tokens[slot, :count] = torch.as_tensor(list(tokens[:count]), dtype=torch.long)
        self.rows[slot] = count
        self.most_rows = max(self.most_rows, count)


def _join(vocab: Tensor, scores: Tensor, values: Tensor) -> Tensor:
    """Log-probabilities (..., V) of vocabulary logits (..., V) and copy scores (..., R) of
    prefix rows holding `values` (..., R), in one softmax."""
    top = scores.amax(-1, keepdim=True).clamp(min=0).detach()  # (..., 1)
    copied = torch.zeros_like(vocab).scatter_add_(-1, values, (scores - top).exp())
    joint = torch.logaddexp(vocab, copied.clamp_min(1e-30).log() + top)  # (..., V)
    return joint.log_softmax(-1)
