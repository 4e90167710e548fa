"""Teacher-forced batches of texts, for training (`retd.model.train`) and for scoring held-out
texts (`retd.model.evaluate`): a text's bytes are the inputs, the same bytes then EOS the
targets, padding `IGNORE`d."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

IGNORE = -100


def encode_texts(texts: list[str], max_length: int) -> list[bytes]:
    """UTF-8 bytes of each text, cut to leave room for the end-of-sequence byte."""
    return [t.encode("utf-8")[: max_length - 1] for t in texts]


def make_batch(
    encoded: list[bytes], rows: np.ndarray, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, T) = the bytes, 0-padded; targets (B, T+1) = the bytes then EOS, padding
    ignored. The model's row t predicts byte t (row 0 from the embedding alone)."""
    lengths = [len(encoded[i]) for i in rows]
    T = max(lengths)
    inputs = torch.zeros(len(rows), T, dtype=torch.long)
    targets = torch.full((len(rows), T + 1), IGNORE, dtype=torch.long)
    for b, (i, n) in enumerate(zip(rows, lengths, strict=True)):
        data = torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8).long()
        inputs[b, :n] = data
        targets[b, :n] = data
        targets[b, n] = eos_id
    return inputs, targets


@torch.no_grad()
def batches_in_order(
    encoded: list[bytes], eos_id: int, batch_size: int = 128
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(rows, inputs, targets) of successive teacher-forced batches, in order: how held-out
    texts are scored."""
    for start in range(0, len(encoded), batch_size):
        rows = np.arange(start, min(start + batch_size, len(encoded)))
        yield rows, *make_batch(encoded, rows, eos_id)
