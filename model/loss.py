"""The loss RET trains on, and the held-out loss per byte that training's evaluations and
`retd promote` score checkpoints by."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from retd.model.batches import IGNORE, batches_in_order, encode_texts, text_bytes
from retd.model.evaluate import heldout_rows
from retd.model.model import RET
from retd.model.tokenizer import BYTES, Tokenizer

if TYPE_CHECKING:
    from retd.model.embed import EmbeddedSplit


def sequence_loss(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    embeddings: torch.Tensor,
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    logits = model(embeddings, inputs)  # (B, T+1, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def heldout_set(
    split: EmbeddedSplit, n: int, max_length: int, tokenizer: Tokenizer = BYTES
) -> tuple[list[str], torch.Tensor, list[np.ndarray]]:
    """The held-out texts training evaluates on: `n` evenly spaced over the split (which is
    grouped by source, so every source counts), their embeddings (n, E) float32 and their
    encoded tokens. `retd promote` scores checkpoints on the same texts."""
    rows = heldout_rows(len(split.texts), n)
    texts = [split.texts[i] for i in rows]
    embeddings = torch.from_numpy(split.embeddings[rows].astype(np.float32))
    return texts, embeddings, encode_texts(texts, max_length, tokenizer)


@torch.no_grad()
def heldout_losses(
    model: RET,
    embeddings: torch.Tensor,
    encoded: list[np.ndarray],
    tokenizer: Tokenizer = BYTES,
    batch_size: int = 128,
) -> tuple[float, float]:
    """Loss per byte (nats; the EOS token counts as one byte) on held-out texts with their own
    embeddings and with the embeddings rolled by one within each batch (another text's
    embedding). Per byte, not per token, so that models with other tokenizers compare. The
    model is scored in eval mode and left in the mode it came in."""
    training = model.training
    model.eval()
    true_total = shuffled_total = 0.0
    device = embeddings.device
    for rows, inputs, targets in batches_in_order(encoded, model.config.eos_id, batch_size):
        emb, inputs, targets = embeddings[rows], inputs.to(device), targets.to(device)
        n = int((targets != IGNORE).sum())
        true_total += float(sequence_loss(model, emb, inputs, targets)) * n
        shuffled_total += float(sequence_loss(model, emb.roll(1, 0), inputs, targets)) * n
    model.train(training)
    count = text_bytes(encoded, tokenizer)
    return true_total / count, shuffled_total / count
