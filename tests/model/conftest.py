"""Shared fixtures for the model tests: small seeded models, one rigged to be predictable."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import strategies as st

from retd.model.model import RET, config_for

EOS = 0
A = ord("A")

#: float32 values a step's logits may hold at the edges: signed zeros, infinities, NaN
EDGE_VALUES = st.sampled_from(
    [0.0, -0.0, 1.0, -1.0, 2.5, float("inf"), float("-inf"), float("nan")]
)


def float_rows(max_width: int) -> st.SearchStrategy[list[list[float]]]:
    """1-5 rows of one width (1..max_width) of edge values and any float32: a (R, V) tensor's
    worth, for the C++ step's row-wise helpers."""
    return st.integers(1, max_width).flatmap(
        lambda width: st.lists(
            st.lists(st.one_of(EDGE_VALUES, st.floats(width=32)), min_size=width, max_size=width),
            min_size=1,
            max_size=5,
        )
    )


@pytest.fixture(autouse=True)
def _deterministic_inputs() -> None:
    """Random test inputs (torch.randn, ...) are the same on every run."""
    torch.manual_seed(1234)


def seeded_model(architecture: str = "ret_tiny", seed: int = 0) -> RET:
    """A randomly initialised model in eval mode, reproducible from seed."""
    model = RET(config_for(architecture))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.fixture
def make_model() -> Callable[..., RET]:
    """seeded_model(architecture="ret_tiny", seed=0), as a fixture."""
    return seeded_model


@pytest.fixture
def tiny_model() -> RET:
    return seeded_model("ret_tiny", seed=0)


def _pattern(n: int, kind: str) -> torch.Tensor:
    """Zero-mean, unit-variance +-1 patterns; 'half' and 'alternate' are orthogonal."""
    i = torch.arange(n)
    if kind == "half":
        return torch.where(i < n // 2, 1.0, -1.0)
    return torch.where(i % 2 == 0, 1.0, -1.0)


@pytest.fixture
def rigged() -> tuple[RET, torch.Tensor, torch.Tensor]:
    """A tiny model whose greedy output depends only on the embedding.

    Returns (model, eos_embedding, a_embedding): the first makes the model emit EOS at once,
    the second makes it emit "AAAA..." forever.
    """
    model = seeded_model("ret_tiny", seed=1)
    C, E = model.config.n_embd, model.config.embedding_dim
    u, w = _pattern(C, "half"), _pattern(C, "alternate")
    with torch.no_grad():
        model.bridge.weight.zero_()
        model.bridge.weight[:, :C] = torch.eye(C)  # cond = LayerNorm(embedding[:C])
        for block in model.blocks:  # the block becomes the identity
            block.attn.proj.weight.zero_()
            block.mlp.proj.weight.zero_()
        model.wte.weight[EOS] = u
        model.wte.weight[A] = w
    eos_embedding, a_embedding = torch.zeros(E), torch.zeros(E)
    eos_embedding[:C], a_embedding[:C] = u, w
    return model, eos_embedding, a_embedding
