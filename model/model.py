"""RET v2.1: a byte-level decoder from a sentence embedding to text.

The whole model in one file, in the spirit of nanoGPT's model.py:

    embedding (B, E) --bridge+LN--> cond (B, C)
    inputs: position 0 = cond, position t >= 1 = wte(byte_{t-1}) + cond
    -> n_layer pre-norm transformer blocks (RoPE attention + GELU MLP), each run
       block_repeat times in a row (depth = n_layer * block_repeat); with conditioning
       "layer", block l first adds its own projection cond_proj[l](cond)
    -> ln_f -> logits = x @ wte.weight.T   (head tied to the byte embedding)

Shapes: B batch, T sequence length, E embedding_dim, C n_embd, H n_head, D head_dim, V vocab_size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONDITIONINGS = ("add", "layer")


@dataclass(frozen=True)
class RETConfig:
    """Hyper-parameters of a RET decoder. The defaults are RET v2.1 (722,944 parameters)."""

    embedding_dim: int = 768  # size of the sentence embedding that conditions the decoder
    n_embd: int = 128
    n_head: int = 4
    n_layer: int = 3
    mlp_hidden: int = 512
    vocab_size: int = 256  # one token per byte
    max_length: int = 256  # most bytes one sequence can generate (= KV cache positions)
    rope_base: float = 10000.0
    eos_id: int = 0
    # How the embedding reaches the blocks: "add" = cond added to every input position only;
    # "layer" = also a learned projection of cond added before every block (n_layer * C * C).
    conditioning: str = "add"
    # Each block's weights run this many times in a row (immediate block-wise weight sharing,
    # as in MobileLLM): depth n_layer * block_repeat for the parameters of n_layer blocks, at
    # block_repeat times the compute and KV cache.
    block_repeat: int = 1

    def __post_init__(self) -> None:
        for name in (
            "embedding_dim", "n_embd", "n_head", "n_layer", "mlp_hidden", "vocab_size",
            "block_repeat",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RETConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int):
            raise ValueError(f"RETConfig.max_length must be an int, got {self.max_length!r}")
        if self.max_length <= 0:
            raise ValueError(f"RETConfig.max_length must be positive, got {self.max_length}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"RETConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"RETConfig head_dim ({self.head_dim}) must be even for RoPE")
        if not (isinstance(self.rope_base, int | float) and self.rope_base > 1):
            raise ValueError(f"RETConfig.rope_base must be a number > 1, got {self.rope_base!r}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(
                f"RETConfig.conditioning must be one of {', '.join(CONDITIONINGS)}, "
                f"got {self.conditioning!r}"
            )
        if not (isinstance(self.eos_id, int) and 0 <= self.eos_id < self.vocab_size):
            raise ValueError(
                f"RETConfig.eos_id must be in [0, {self.vocab_size}), got {self.eos_id!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def depth(self) -> int:
        """Blocks a position passes through (each of the n_layer run block_repeat times)."""
        return self.n_layer * self.block_repeat

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RETConfig:
        """Build a config from a dict; missing keys take defaults, unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown RETConfig key(s): {', '.join(unknown)}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        return cls(**dict(d))


_ARCHITECTURES: dict[str, RETConfig] = {
    # Three thin blocks: the shape search's winner per hour of training here (README).
    "ret_v21": RETConfig(),
    # RET v2.1's first shape (one wide block), under which the first checkpoints trained;
    # they name `ret_v21` and carry this config in their card, so they load either way.
    "ret_v21_wide": RETConfig(n_embd=256, n_head=2, n_layer=1, mlp_hidden=384),
    # Same interface (768-dim embedding, bytes), small enough for fast tests.
    "ret_tiny": RETConfig(n_embd=64, n_head=2, n_layer=1, mlp_hidden=96, max_length=64),
}
#: The registered architectures by name (read-only; `register_architecture` adds one).
ARCHITECTURES: Mapping[str, RETConfig] = MappingProxyType(_ARCHITECTURES)
# The module class of each architecture that is not plain RET.
_MODULE_CLASSES: dict[str, type[RET]] = {}


def register_architecture(
    name: str, config: RETConfig, module_class: type[RET] | None = None
) -> None:
    """Register an architecture: its config and, when it is not plain RET, the module class
    that implements it (a subclass of RET). A name is registered once."""
    if name in _ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is registered already")
    _ARCHITECTURES[name] = config
    if module_class is not None:
        _MODULE_CLASSES[name] = module_class


def config_for(architecture: str, overrides: Mapping[str, Any] | None = None) -> RETConfig:
    """The config of a named architecture, with optional field overrides."""
    if architecture not in ARCHITECTURES:
        raise KeyError(
            f"unknown architecture {architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        )
    config = ARCHITECTURES[architecture]
    if overrides:
        merged = config.to_dict()
        merged.update(overrides)
        config = RETConfig.from_dict(merged)  # raises ValueError on unknown keys
    return config


class KVCache:
    """Preallocated keys/values for `num_slots` sequences.

    k, v: (depth, num_slots, n_head, length, head_dim), length max_length unless given (a
    text after a prefix needs more). A slot is one sequence's row; the caller decides which
    slot each sequence uses and which positions are valid.
    """

    def __init__(
        self,
        config: RETConfig,
        num_slots: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        length: int | None = None,
    ) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.length = config.max_length if length is None else length
        shape = (config.depth, num_slots, config.n_head, self.length, config.head_dim)
        self.config = config
        self.num_slots = num_slots
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def set_prefix(self, slot: int, tokens: Sequence[int]) -> None:
        """The tokens a slot's text follows (`RET.prefill` writes their keys and values):
        plain RET keeps nothing more; a copying model's cache keeps the tokens themselves."""


def apply_rope(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotate x (B, H, T, D) by its positions (B, T) or (T,), rotate-half convention.

    Angles are computed in float32 so low-precision models keep exact positions.
    """
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)  # (D/2,)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2) or (T, D/2)
    cos, sin = angles.cos().unsqueeze(-3), angles.sin().unsqueeze(-3)  # broadcast over heads
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE on q and k, and a KV-cached single step."""

    def __init__(self, config: RETConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.rope_base = config.rope_base
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = 0.0  # of the attention weights, in training only (RET.set_dropout)

    def _rope(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE on q and k (B, H, T, D) in one pass: the same elementwise ops, half the calls."""
        rotated = apply_rope(torch.cat((q, k), dim=1), positions, self.rope_base)
        return rotated[:, : self.n_head], rotated[:, self.n_head :]

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, C) -> q, k, v each (B, H, T, D)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        return tuple(t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """Full causal attention over x (B, T, C), positions 0..T-1. `cache` (this layer's
        k_cache, v_cache, and slots (B,)): also write each row's keys and values there."""
        B, T, C = x.shape
        q, k, v = self._heads(x)  # (B, H, T, D)
        positions = torch.arange(T, device=x.device)
        q, k = self._rope(q, k, positions)
        if cache is not None:
            k_cache, v_cache, slots = cache
            k_cache[slots, :, :T] = k
            v_cache[slots, :, :T] = v
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def step(
        self,
        x: Tensor,
        positions: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        slots: Tensor,
        length: int | None = None,
        span: int | None = None,
    ) -> Tensor:
        """One new position per row: x (B, 1, C) at positions (B,), cached in k/v_cache[slots].

        k_cache, v_cache: (num_slots, H, max_length, D) for this layer; written in place.
        length = max(positions) + 1 and span = max(slots) + 1 when the caller knows them
        (else they are read from the device, a sync on CUDA).
        """
        B, _, C = x.shape
        q, k, v = self._heads(x)  # (B, H, 1, D)
        q, k = self._rope(q, k, positions[:, None])
        k_cache[slots, :, positions] = k[:, :, 0]  # (B, H, D) into each row's own position
        v_cache[slots, :, positions] = v[:, :, 0]
        if length is None:
            length = int(positions.max()) + 1  # attend only as far as the furthest row
        if span is None:
            span = int(slots.max()) + 1
        # Attend through a view of cache slots 0..span-1 rather than gathering each row's
        # slot (a copy of B*H*L*D keys and values every step): queries go to their slots,
        # and slots no row uses attend to their position 0 only, their output unused.
        q_at_slot = q.new_zeros(span, self.n_head, 1, self.head_dim)
        q_at_slot[slots] = q
        position_at_slot = positions.new_zeros(span)
        position_at_slot[slots] = positions
        steps = torch.arange(length, device=x.device)
        visible = steps[None, :] <= position_at_slot[:, None]  # (S, L)
        keys, values = k_cache[:span, :, :length], v_cache[:span, :, :length]  # (S, H, L, D)
        y = F.scaled_dot_product_attention(
            q_at_slot, keys, values, attn_mask=visible[:, None, None, :]
        )[slots]  # (B, H, 1, D)
        return self.proj(y.transpose(1, 2).reshape(B, 1, C))


class MLP(nn.Module):
    """Linear -> GELU -> Linear, no biases."""

    def __init__(self, config: RETConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); in training the
    two branches' outputs may be dropped out (`drop`, p 0 unless RET.set_dropout)."""

    def __init__(self, config: RETConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), cache))
        return x + self.drop(self.mlp(self.ln_2(x)))

    def step(
        self,
        x: Tensor,
        positions: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        slots: Tensor,
        length: int | None = None,
        span: int | None = None,
    ) -> Tensor:
        x = x + self.attn.step(self.ln_1(x), positions, k_cache, v_cache, slots, length, span)
        return x + self.mlp(self.ln_2(x))


class RET(nn.Module):
    """The RET decoder: sentence embedding in, next-byte logits out."""

    def __init__(self, config: RETConfig) -> None:
        super().__init__()
        self.config = config
        self.bridge = nn.Linear(config.embedding_dim, config.n_embd, bias=False)
        self.ln_bridge = nn.LayerNorm(config.n_embd)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # also the output head (tied)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        # Per-layer conditioning: block l's input gets cond_proj[l](cond) added.
        self.cond_proj = nn.ModuleList(
            nn.Linear(config.n_embd, config.n_embd, bias=False)
            for _ in range(config.n_layer if config.conditioning == "layer" else 0)
        )
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """nanoGPT init: N(0, 0.02) weights, residual projections N(0, 0.02/sqrt(2*depth)),
        LayerNorm weight 1 and bias 0. Pass a generator for seeded init without global RNG."""
        residual_std = 0.02 / math.sqrt(2 * self.config.depth)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                std = residual_std if name.endswith(".proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def layers(self) -> list[tuple[Block, nn.Module | None]]:
        """What each of the `depth` layers runs: its block and its conditioning projection."""
        repeat = self.config.block_repeat
        return [
            (
                cast(Block, self.blocks[i // repeat]),
                self.cond_proj[i // repeat] if self.cond_proj else None,
            )
            for i in range(self.config.depth)
        ]

    def set_dropout(self, p: float) -> None:
        """Dropout p on every block's attention weights and residual branches while in train
        mode (a training setting, not part of the shape: no parameters, and eval mode, every
        decode path included, never drops)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p!r}")
        for block in self.blocks:
            cast(Block, block).drop.p = p
            cast(Block, block).attn.dropout = p

    def num_parameters(self) -> int:
        """Number of parameters (the tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def condition(self, embedding: Tensor) -> Tensor:
        """Sentence embedding (B, E) -> conditioning vector cond (B, C)."""
        embedding = embedding.to(self.bridge.weight.dtype)
        return self.ln_bridge(self.bridge(embedding))

    def _logits(self, x: Tensor) -> Tensor:
        """Final norm and tied head: (..., C) -> (..., V)."""
        return self.ln_f(x) @ self.wte.weight.T

    def forward(self, embedding: Tensor, tokens: Tensor) -> Tensor:
        """Reference path without a cache.

        embedding (B, E), tokens (B, T) long, T >= 0 -> logits (B, T+1, V);
        row t predicts byte t (row 0 from cond alone).
        """
        return self._logits(self.hidden(embedding, tokens))  # (B, T+1, V)

    def hidden(
        self,
        embedding: Tensor,
        tokens: Tensor,
        cache: KVCache | None = None,
        slots: Tensor | None = None,
    ) -> Tensor:
        """The last block's output (B, T+1, C), before ln_f and the head (see forward). With
        a `cache`, every layer's keys and values of positions 0..T are written to its
        `slots` (B,) too: a prefill, after which `step` goes on at position T+1."""
        cond = self.condition(embedding)[:, None, :]  # (B, 1, C)
        x = torch.cat((cond, self.wte(tokens) + cond), dim=1)  # (B, T+1, C)
        for layer, (block, proj) in enumerate(self.layers()):
            if proj is not None:
                x = x + proj(cond)  # (B, 1, C) broadcast over positions
            kv = None if cache is None or slots is None else (cache.k[layer], cache.v[layer], slots)
            x = block(x, kv)
        return x

    def prefill(
        self, embedding: Tensor, prefixes: Sequence[Sequence[int]], cache: KVCache
    ) -> Tensor:
        """Write row i's prefix but its last token into cache slot i in one forward pass
        (rows right-padded to the longest: causal attention never reads the padding, and a
        step writes a position before it reads it): position 0 (the embedding alone), then
        prefix token s - 1 at position s. Returns the hidden states (B, P, C) of positions
        0..P-1, P the longest prefix."""
        for slot, prefix in enumerate(prefixes):
            cache.set_prefix(slot, prefix)
        longest = max(len(p) for p in prefixes)
        tokens = torch.zeros(len(prefixes), max(longest - 1, 0), dtype=torch.long)
        for row, prefix in enumerate(prefixes):
            tokens[row, : max(len(prefix) - 1, 0)] = torch.as_tensor(list(prefix[:-1]))
        slots = torch.arange(len(prefixes), device=embedding.device)
        return self.hidden(embedding, tokens.to(embedding.device), cache, slots)

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
        """Decode one new position per row with the KV cache (continuous batching).

        cond (B, C); tokens (B,) long: previous byte, ignored where positions == 0;
        positions (B,) long, may differ per row; slots (B,) long: rows of `cache`;
        length = max(positions) + 1 and span = max(slots) + 1 if known on the host (else read
        from the device).
        Returns logits (B, V).
        """
        return self._logits(self.step_hidden(cond, tokens, positions, cache, slots, length, span))

    def step_hidden(
        self,
        cond: Tensor,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache,
        slots: Tensor,
        length: int | None = None,
        span: int | None = None,
    ) -> Tensor:
        """`step`'s last block output (B, C), before ln_f and the head."""
        first = positions == 0
        prev = self.wte(tokens.masked_fill(first, 0))  # (B, C); ignored ids may be out of range
        x = torch.where(first[:, None], cond, prev + cond)[:, None, :]  # (B, 1, C)
        for layer, (block, proj) in enumerate(self.layers()):
            if proj is not None:
                x = x + proj(cond)[:, None, :]
            x = block.step(x, positions, cache.k[layer], cache.v[layer], slots, length, span)
        return x[:, 0]  # (B, C)

    def cache(
        self,
        num_slots: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        length: int | None = None,
    ) -> KVCache:
        """A KV cache for `step` (a model that keeps more per slot returns its own kind)."""
        return KVCache(self.config, num_slots, device, dtype, length)


def model_class(architecture: str) -> type[RET]:
    """The module class that implements a registered architecture."""
    return _MODULE_CLASSES.get(architecture, RET)
