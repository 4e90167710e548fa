"""`retd embed`: the corpus's texts -> float16 embedding shards, resumable.

Shard `k` of a split holds the embeddings of lines [k * SHARD_SIZE, (k + 1) * SHARD_SIZE) of
`<split>.txt`. A shard is written to a temporary name and renamed when complete, so an
interrupted run resumes at the first missing shard and never reads a half-written one.
Training can start on the shards that exist while the rest are still being embedded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

SHARD_SIZE = 4096
# The held-out sets first (small: training's validation and `retd eval` can start early), then
# the training split; a corpus without ood.txt (older than the ood split) skips it.
SPLITS = ("heldout", "ood", "train")
# Splits of which only this many shards are embedded before train (the rest after it).
EARLY_SHARDS: Mapping[str, int] = MappingProxyType({"ood": 1})


def shard_path(data_dir: Path, split: str, index: int) -> Path:
    return data_dir / "embeddings" / split / f"shard-{index:05d}.npy"


def shard_order(n_shards: int, start: int = 0) -> list[int]:
    """The order shards are embedded in: a fixed seeded permutation, begun at `start`."""
    order = np.random.default_rng(0).permutation(n_shards).tolist()
    start %= max(n_shards, 1)
    return order[start:] + order[:start]


def _write_settings(data_dir: Path, shard_size: int) -> None:
    """DIR/embeddings/embeddings.json: the shard size `load_split` reads the shards by."""
    (data_dir / "embeddings").mkdir(parents=True, exist_ok=True)
    (data_dir / "embeddings" / "embeddings.json").write_text(
        json.dumps({"shard_size": shard_size}, indent=2) + "\n"
    )


def embed_corpus(
    data_dir: Path,
    encode: Callable[[Sequence[str]], np.ndarray],
    splits: Sequence[str] = SPLITS,
    shard_size: int = SHARD_SIZE,
    progress: bool = True,
    early: Mapping[str, int] = EARLY_SHARDS,
    start_shard: int = 0,
) -> dict[str, int]:
    """Embed every missing shard of each split; returns how many shards each split has.
    `start_shard` K starts the train split's shard order at its K-th entry (wrapping round):
    a session going on from a checkpoint trained on the first K shards of that order embeds
    the shards it never saw first."""
    counts: dict[str, int] = {}
    _write_settings(data_dir, shard_size)
    # Two passes: held-out, the first `early` shards of a split named there (enough of the
    # ood set to evaluate on), then train; the rest of those splits after train.
    for pass_ in (0, 1):
        for split in splits:
            if not (data_dir / "corpus" / f"{split}.txt").exists():
                continue
            limit = early.get(split) if pass_ == 0 else None
            if pass_ == 1 and split not in early:
                continue
            start = start_shard if split == "train" else 0
            counts[split] = _embed_split(
                data_dir, split, encode, shard_size, limit, progress, start
            )
    return counts


def _embed_split(
    data_dir: Path,
    split: str,
    encode: Callable[[Sequence[str]], np.ndarray],
    shard_size: int,
    limit: int | None,
    progress: bool,
    start: int = 0,
) -> int:
    """Embed the missing shards of one split (at most `limit` of its shard order, which
    begins at its `start`-th entry); returns how many shards the split has."""
    from tqdm import tqdm

    from retd.model.corpus import read_texts

    texts = read_texts(data_dir / "corpus" / f"{split}.txt")
    n_shards = (len(texts) + shard_size - 1) // shard_size
    # Shards in a seeded random order: a run stopped early has embedded a sample of every
    # source, not the first sources only (each split's lines are grouped by source).
    order = shard_order(n_shards, start)[:limit]
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
    return n_shards


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


def write_split(data_dir: Path, split: str, texts: Sequence[str], embeddings: np.ndarray) -> None:
    """Write texts and their embeddings in the layout `load_split` reads (one shard, float16):
    a small embedded sample of a split, like the test fixture tests/data/heldout_head."""
    if len(texts) != len(embeddings) or len(texts) > SHARD_SIZE:
        raise ValueError(f"{len(texts)} texts, {len(embeddings)} embeddings (one shard at most)")
    (data_dir / "corpus").mkdir(parents=True, exist_ok=True)
    (data_dir / "corpus" / f"{split}.txt").write_text(
        "".join(f"{t}\n" for t in texts), encoding="utf-8"
    )
    _write_settings(data_dir, SHARD_SIZE)
    path = shard_path(data_dir, split, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(embeddings, dtype=np.float16))
