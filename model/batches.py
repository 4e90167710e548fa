"""Teacher-forced batches of texts, for training (`retd.model.train`) and for scoring held-out
texts (`retd.model.evaluate`): a text's tokens are the inputs, the same tokens then EOS the
targets, padding `IGNORE`d."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from retd.model.tokenizer import BYTES, Tokenizer

IGNORE = -100


def encode_texts(
    texts: Sequence[str], max_length: int, tokenizer: Tokenizer = BYTES
) -> list[np.ndarray]:
    """Token ids of each text (uint16), cut to leave room for the end-of-sequence token."""
    if tokenizer.kind == "bytes":
        return [
            np.frombuffer(t.encode("utf-8")[: max_length - 1], np.uint8).astype(np.uint16)
            for t in texts
        ]
    return [np.asarray(ids[: max_length - 1], np.uint16) for ids in tokenizer.encode_batch(texts)]


def byte_lengths(encoded: Sequence[np.ndarray], tokenizer: Tokenizer = BYTES) -> np.ndarray:
    """How many bytes of text each encoded row holds (its tokens' bytes)."""
    if tokenizer.kind == "bytes":
        return np.array([len(ids) for ids in encoded], dtype=np.int64)
    sizes = np.array([len(p) for p in tokenizer.pieces], dtype=np.int64)
    return np.array([int(sizes[ids].sum()) for ids in encoded], dtype=np.int64)


def text_bytes(encoded: Sequence[np.ndarray], tokenizer: Tokenizer = BYTES) -> int:
    """Bytes of text of all encoded rows plus one per end-of-sequence token: what a loss per
    byte divides the summed token losses by."""
    return int(byte_lengths(encoded, tokenizer).sum()) + len(encoded)


def make_batch(
    encoded: Sequence[np.ndarray], rows: np.ndarray, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, T) = the tokens, 0-padded; targets (B, T+1) = the tokens then EOS, padding
    ignored. The model's row t predicts token t (row 0 from the embedding alone). Vectorised:
    one concatenation and two masked writes, whatever B (a GPU's batches of thousands)."""
    lengths = np.array([len(encoded[i]) for i in rows], dtype=np.int64)
    tokens = torch.from_numpy(np.concatenate([encoded[i] for i in rows]).astype(np.int64))
    T = int(lengths.max())
    filled = torch.arange(T) < torch.from_numpy(lengths)[:, None]  # (B, T), row-major = text order
    inputs = torch.zeros(len(rows), T, dtype=torch.long)
    inputs[filled] = tokens
    targets = torch.full((len(rows), T + 1), IGNORE, dtype=torch.long)
    targets[:, :T][filled] = tokens
    targets[torch.arange(len(rows)), torch.from_numpy(lengths)] = eos_id
    return inputs, targets


def drop_tokens(
    inputs: torch.Tensor, p: float, token: int, generator: torch.Generator
) -> torch.Tensor:
    """Inputs (B, T) with each token replaced by `token` with probability p (word dropout, as
    in Bowman et al. 2016: the decoder learns to say what the embedding says, not only what the
    text so far suggests). The targets stay whole; p 0 returns the inputs themselves."""
    if p <= 0:
        return inputs
    dropped = torch.rand(inputs.shape, generator=generator, device=inputs.device) < p
    return inputs.masked_fill(dropped, token)


@torch.no_grad()
def batches_in_order(
    encoded: Sequence[np.ndarray], eos_id: int, batch_size: int = 128
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(rows, inputs, targets) of successive teacher-forced batches, in order: how held-out
    texts are scored."""
    for start in range(0, len(encoded), batch_size):
        rows = np.arange(start, min(start + batch_size, len(encoded)))
        yield rows, *make_batch(encoded, rows, eos_id)


def bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, max_tokens: int = 0
) -> Iterator[np.ndarray]:
    """An epoch of batches of similar lengths, in random order: shuffle, sort chunks of 64
    batches by length, cut into batches, shuffle the batches. With `max_tokens`, a batch is
    also cut before its rows times its longest row (+1 for EOS) would pass it: long texts
    come in fewer rows, so one long bucket does not take a GPU's memory."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 64
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        if not max_tokens:
            batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
            continue
        first = 0
        for i, longest in enumerate(lengths[part] + 1):  # ascending: row i is the longest
            if i > first and (i - first >= batch_size or (i - first + 1) * longest > max_tokens):
                batches.append(part[first:i])
                first = i
        batches.append(part[first:])
    for k in rng.permutation(len(batches)):
        yield batches[k]
