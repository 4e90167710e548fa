"""The C++ step's greedy pick (`argmax_rows`: amax, then the first index equal to it) is
torch.argmax to the index, ties, infinities, signed zeros and NaNs included."""

from __future__ import annotations

import torch
from hypothesis import given, settings

from retd.model.cpp_step import load_extension
from tests.model.conftest import float_rows


@settings(max_examples=300, deadline=None)
@given(rows=float_rows(6))
def test_argmax_rows_is_torch_argmax(rows: list[list[float]]) -> None:
    x = torch.tensor(rows, dtype=torch.float32)
    assert load_extension().argmax_rows(x).tolist() == x.argmax(-1).tolist()


def test_argmax_rows_of_a_step_sized_batch() -> None:
    x = torch.randn(40, 1792, generator=torch.Generator().manual_seed(0))
    x[3, 7] = x[3, 900] = x[3].max() + 1  # a tie: the first wins
    x[5, 11] = float("nan")
    assert load_extension().argmax_rows(x).tolist() == x.argmax(-1).tolist()
