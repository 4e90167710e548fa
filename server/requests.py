"""What a caller asks a model for, validated: one embedding, and either sampling parameters
(a decode, RET) or search parameters (a phrase bank's one-step search). Each value has one
home: the seed a response reports is its params' own (`SamplingParams.seed` draws with it;
`SearchParams.seed` is only echoed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retd.model.decoding import SamplingParams


@dataclass(frozen=True)
class SearchParams:
    """A phrase bank's search: answered whole in the step it joins; no token is sampled."""

    candidates: int = 1  # how many nearest phrases to return
    seed: int = 0  # echoed in the response, nothing more: a search is exact
    # Decode on a bank with an editor (model/bank_editor.py): the answer is the pick of its
    # nearest phrases and the editor's edits of them (the one candidate returned).
    edit: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int):
            raise ValueError(f"candidates must be an int >= 1, got {self.candidates!r}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be an int >= 1, got {self.candidates!r}")


@dataclass(frozen=True)
class SequenceRequest:
    """One embedding to decode (SamplingParams) or to search a bank with (SearchParams)."""

    embedding: np.ndarray  # (embedding_dim,) float32
    params: SamplingParams | SearchParams
    stream: bool = False  # deliver a TokenDelta after every step
    deadline: float | None = None  # time.monotonic() by which it must finish
    priority: int = 0  # higher is served first; FIFO among equals

    @property
    def seed(self) -> int:
        """The seed the response reports: the params' (0 when a greedy decode has none)."""
        return self.params.seed or 0
