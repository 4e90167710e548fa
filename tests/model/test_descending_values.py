"""The C++ draw's sort (`descending_values`: a row's NaNs first, then a radix sort of its
values' bits) gives the values numpy's sort gives (sampling.py's `_descending_values`, what
the Python sampler filters on), infinities, signed zeros and NaNs included."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings

from retd.model.cpp_step import load_extension
from retd.model.sampling import _descending_values
from tests.model.conftest import float_rows


def assert_same_values(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal element by element (+0 == -0: equal values may come in either order), NaN
    where NaN."""
    assert got.shape == expected.shape
    assert bool(((got == expected) | (got.isnan() & expected.isnan())).all())


@settings(max_examples=300, deadline=None)
@given(rows=float_rows(40))
def test_descending_values_are_numpys_sort_reversed(rows: list[list[float]]) -> None:
    x = torch.tensor(rows, dtype=torch.float32)
    assert_same_values(load_extension().descending_values(x), _descending_values(x))


def test_descending_values_of_a_step_sized_batch_and_the_input_untouched() -> None:
    x = torch.randn(64, 1792, generator=torch.Generator().manual_seed(0)) * 4
    x[1, 3] = x[1, 4] = float("nan")  # NaNs first, then the rest still sorted
    x[2] = 0.0
    x[2, ::3] = -0.0  # one radix digit shared by most keys: passes are skipped
    x[3, 5], x[3, 6] = float("inf"), float("-inf")
    x[4] = 7.0  # every key equal
    before = x.clone()
    sorted_ = load_extension().descending_values(x)
    assert torch.equal(x.view(torch.int32), before.view(torch.int32))
    assert_same_values(sorted_, _descending_values(x))
    assert bool(sorted_[1, :2].isnan().all()) and not bool(sorted_[1, 2:].isnan().any())
    # the multiset of bits is kept: nothing lost or invented (signed zeros included)
    for row in (0, 2, 3):
        assert sorted(sorted_[row].view(torch.int32).tolist()) == sorted(
            x[row].view(torch.int32).tolist()
        )
    assert np.all(np.diff(sorted_[0].numpy()) <= 0)
