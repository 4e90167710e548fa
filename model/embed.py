"""`retd embed`: the corpus's texts -> float16 embedding shards, resumable.

Shard `k` of a split holds the embeddings of lines [k * SHARD_SIZE, (k + 1) * SHARD_SIZE) of
`<split>.txt`. A shard is written to a temporary name and renamed when complete, so an
interrupted run resumes at the first missing shard and never reads a half-written one.
Training can start on the shards that exist while the rest are still being embedded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARD_SIZE = 4096
# The held-out sets first (small: training's validation and `retd eval` can start early), then
# the training split; a corpus without ood.txt (older than the ood split) skips it.
SPLITS = ("heldout", "ood", "train")


def shard_path(data_dir: Path, split: str, index: int) -> Path:
    return data_dir / "embeddings" / split / f"shard-{index:05d}.npy"


def embed_corpus(
    data_dir: Path,
    encode: Callable[[Sequence[str]], np.ndarray],
    splits: Sequence[str] = SPLITS,
    shard_size: int = SHARD_SIZE,
    progress: bool = True,
) -> dict[str, int]:
    """Embed every missing shard of each split; returns how many shards each split has."""
    from tqdm import tqdm

    from retd.model.corpus import read_texts

    counts = {}
    (data_dir / "embeddings").mkdir(parents=True, exist_ok=True)
    (data_dir / "embeddings" / "embeddings.json").write_text(
        json.dumps({"shard_size": shard_size}, indent=2) + "\n"
    )
    for split in splits:
        if not (data_dir / "corpus" / f"{split}.txt").exists():
            continue
        texts = read_texts(data_dir / "corpus" / f"{split}.txt")
        n_shards = (len(texts) + shard_size - 1) // shard_size
        # Shards in a seeded random order: a run stopped early has embedded a sample of every
        # source, not the first sources only (each split's lines are grouped by source).
        order = np.random.default_rng(0).permutation(n_shards).tolist()
        todo = [k for k in order if not shard_path(data_dir, split, k).exists()]
        bar = tqdm(
            total=len(texts),
            initial=(n_shards - len(todo)) * shard_size,
            desc=f"embed {split}",
            unit="text",
            disable=not progress,
        )
        for k in todo:
            chunk = texts[k * shard_size : (k + 1) * shard_size]
            vectors = encode(chunk).astype(np.float16)
            path = shard_path(data_dir, split, k)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial.npy")
            np.save(partial, vectors)
            partial.rename(path)
            bar.update(len(chunk))
        bar.close()
        counts[split] = n_shards
    return counts


def count_shards(data_dir: Path, split: str) -> int:
    """How many complete shards of a split exist now."""
    return len(list((data_dir / "embeddings" / split).glob("shard-?????.npy")))


@dataclass(frozen=True)
class EmbeddedSplit:
    texts: list[str]
    embeddings: np.ndarray  # (N, 768) float16, row i embeds texts[i]


def load_split(data_dir: Path, split: str) -> EmbeddedSplit:
    """The texts of a split that have embeddings so far (its complete shards, in line order)."""
    from retd.model.corpus import read_texts

    settings = data_dir / "embeddings" / "embeddings.json"
    shard_size = json.loads(settings.read_text())["shard_size"] if settings.exists() else SHARD_SIZE
    texts = read_texts(data_dir / "corpus" / f"{split}.txt")
    kept_texts: list[str] = []
    arrays = []
    for k in range((len(texts) + shard_size - 1) // shard_size):
        path = shard_path(data_dir, split, k)
        if path.exists():
            arrays.append(np.load(path))
            kept_texts += texts[k * shard_size : (k + 1) * shard_size]
            if len(arrays[-1]) != len(kept_texts) - sum(len(a) for a in arrays[:-1]):
                raise ValueError(f"{path} does not match the lines of {split}.txt")
    embeddings = np.concatenate(arrays) if arrays else np.zeros((0, 768), np.float16)
    return EmbeddedSplit(kept_texts, embeddings)
