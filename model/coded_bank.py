"""Phrase banks whose embeddings are stored as codes: 32 bytes a phrase instead of 1,536, so
that the training split's 951k embeddings travel in the repository (model/datastore, 37 MB)
and a fresh clone serves the retrieve-edit-verify default without embedding them for hours.

A `Quantizer` is OPQ product quantisation (faiss): a learnt rotation of the 768-dim space,
then M sub-vectors, each replaced by the nearest of its 256 centroids (one byte). A
`CodedPhraseBank` searches in two stages: faiss's asymmetric inner products of the asked
embedding with every code find `rescore` candidates, the sentence encoder re-embeds those
phrases, and their exact cosine orders the k returned (every score returned is exact).

    retd compress-bank BANK --out DIR [--m 32] [--sample 100000] [--seed 0] [--opq-iterations 50]
        [--threads 1]
    retd build-phrase-bank --from-split DATA --codes DIR --out BANK

A coded bank's directory is a phrase bank's (card.json with `dtype: "opq"`, phrases.json)
with `codes.safetensors` (rotation, centroids, codes) in place of the embeddings. The shipped
codes (`compress-bank`'s DIR) also hold each phrase's key (4 bytes of its BLAKE2b), so a
corpus rebuilt from newer packages finds the codes of the texts it shares with them and only
the new texts are embedded.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .checkpoint import CARD_FILE, CARD_FORMAT, CheckpointError, atomic_write, write_card
from .encoder import Encode, sha256_file

CODES_FILE = "codes.safetensors"
CODED = "opq"  # a coded bank's card "dtype"
CODES_KIND = "phrase_codes"  # the card "kind" of compress-bank's output
RESCORE = 32  # candidates re-embedded a query: README, "A datastore that travels"
CENTROIDS = 256  # one byte a sub-vector
QUANTIZER_TENSORS = ("rotation", "centroids")


def _faiss(threads: int = 1) -> Any:
    """faiss on `threads` OpenMP threads (searches take one: its threads spin while waiting;
    with another job on this 2-core machine, a test's fit on both took over 300 s, on one 96 s)."""
    import faiss  # training and searching the codes

    faiss.omp_set_num_threads(threads)
    return faiss


@functools.cache
def installed_encode() -> Encode:
    """The installed sentence encoder's `auto` encode, loaded once, at its first use."""
    from .encoder import SentenceEncoder

    return SentenceEncoder.load(precision="auto").encode


def is_coded(bank: Path) -> bool:
    """Whether the phrase bank at `bank` stores codes (its card's dtype is "opq")."""
    try:
        return json.loads((bank / CARD_FILE).read_text(encoding="utf-8")).get("dtype") == CODED
    except (OSError, ValueError, AttributeError):
        return False  # loading it says what is wrong


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """(N,) int32: the first 4 bytes of each text's BLAKE2b (of its UTF-8), little-endian."""
    digests = b"".join(hashlib.blake2b(t.encode(), digest_size=4).digest() for t in texts)
    return np.frombuffer(digests, dtype="<i4").copy()


@dataclass(frozen=True)
class Quantizer:
    """OPQ: vector x (D,) is coded as the nearest centroid of each of M sub-vectors of
    rotation @ x."""

    rotation: np.ndarray  # (D, D) float32, orthogonal
    centroids: np.ndarray  # (M, 256, D / M) float32

    @property
    def m(self) -> int:
        return int(self.centroids.shape[0])

    @classmethod
    def fit(
        cls, sample: np.ndarray, m: int, seed: int = 0, opq_iterations: int = 50,
        iterations: int = 25, threads: int = 1,
    ) -> Quantizer:  # fmt: skip
        """Learn the rotation (`opq_iterations`, faiss's default) and then the centroids
        (`iterations` of k-means) from `sample` (N, D), N ≥ max(256, D), D divisible by m."""
        faiss = _faiss(threads)
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        n, dim = sample.shape
        if n < max(CENTROIDS, dim) or dim % m:  # (faiss's OPQ crashes on fewer rows than dim)
            raise ValueError(
                f"a quantizer needs at least {max(CENTROIDS, dim)} sample rows ({CENTROIDS} "
                f"and the dimension) and a dimension divisible by m; got {n} rows of {dim} "
                f"and m {m}"
            )

        def quantizer() -> Any:
            pq = faiss.ProductQuantizer(dim, m, 8)
            pq.cp.seed, pq.cp.niter, pq.cp.min_points_per_centroid = seed, iterations, 1
            return pq

        opq, inner = faiss.OPQMatrix(dim, m), quantizer()
        opq.pq, opq.niter = inner, opq_iterations  # inner: seeded, and quiet about small samples
        opq.train(sample)
        rotation = faiss.vector_to_array(opq.A).reshape(dim, dim).astype(np.float32)
        pq = quantizer()
        pq.train(np.ascontiguousarray(sample @ rotation.T))
        centroids = faiss.vector_to_array(pq.centroids).reshape(m, CENTROIDS, dim // m)
        return cls(rotation, centroids.astype(np.float32))

    def _pq(self) -> Any:
        faiss = _faiss()
        dim = self.rotation.shape[0]
        pq = faiss.ProductQuantizer(dim, self.m, 8)
        faiss.copy_array_to_vector(self.centroids.ravel(), pq.centroids)
        return pq

    def codes(self, vectors: np.ndarray) -> np.ndarray:
        """(N, M) uint8: each row's codes."""
        rotated = np.ascontiguousarray(np.asarray(vectors, np.float32) @ self.rotation.T)
        return np.asarray(self._pq().compute_codes(rotated), dtype=np.uint8)

    def index(self, codes: np.ndarray) -> Any:
        """A faiss IndexPQ (inner product) over `codes`, searched with rotated queries."""
        faiss = _faiss()
        index = faiss.IndexPQ(self.rotation.shape[0], self.m, 8, faiss.METRIC_INNER_PRODUCT)
        faiss.copy_array_to_vector(self.centroids.ravel(), index.pq.centroids)
        index.is_trained = True
        index.add_sa_codes(np.ascontiguousarray(codes, dtype=np.uint8))
        return index

    def tensors(self) -> dict[str, np.ndarray]:
        return {"rotation": self.rotation, "centroids": self.centroids}


class CodedPhraseBank:
    """Phrases and their embeddings' codes, searched by the codes then by re-embedding.

    `encode` embeds phrases as the bank's embeddings were (all-mpnet-base-v2); `rescore`
    candidates a query are re-embedded (at least k)."""

    def __init__(
        self,
        phrases: Sequence[str],
        quantizer: Quantizer,
        codes: np.ndarray,
        encode: Encode,
        rescore: int = RESCORE,
    ) -> None:
        if codes.shape != (len(phrases), quantizer.m):
            raise ValueError(
                f"{len(phrases)} phrases need ({len(phrases)}, {quantizer.m}) codes, got "
                f"shape {codes.shape}"
            )
        self.phrases = list(phrases)
        self.quantizer = quantizer
        self.index = quantizer.index(codes)
        self.encode = encode
        self.rescore = rescore
        self.max_bytes = max((len(p.encode()) for p in self.phrases), default=0)

    def __len__(self) -> int:
        return len(self.phrases)

    @property
    def dim(self) -> int:
        return int(self.quantizer.rotation.shape[0])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As `PhraseBank.search`: (scores, rows), (len(queries), min(k, len(self))), best
        first, each score the exact cosine of the asked embedding and the re-embedded phrase."""
        k = min(k, len(self))
        unit = torch.nn.functional.normalize(queries.detach().float().cpu(), dim=1).numpy()
        rotated = np.ascontiguousarray(unit @ self.quantizer.rotation.T)
        _, found = self.index.search(rotated, min(max(self.rescore, k), len(self)))  # (B, R)
        rows = np.unique(found)
        texts = [self.phrases[r] for r in rows.tolist()]
        vectors = np.asarray(self.encode(texts), dtype=np.float32)  # (U, D), U ≤ B × R
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        exact = np.einsum("bd,brd->br", unit, vectors[np.searchsorted(rows, found)])  # (B, R)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(exact, order, axis=1).astype(np.float32)
        chosen = np.take_along_axis(found, order, axis=1).astype(np.int64)
        return torch.from_numpy(scores), torch.from_numpy(chosen)


def compress(
    embeddings: np.ndarray, m: int = 32, sample: int = 100_000, seed: int = 0,
    opq_iterations: int = 50, threads: int = 1,
) -> tuple[Quantizer, np.ndarray]:  # fmt: skip
    """A quantizer fit (on `threads`) on `sample` rows drawn (seeded) from `embeddings`, and
    every row's codes."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(embeddings), min(sample, len(embeddings)), replace=False))
    vectors = np.asarray(embeddings[rows], np.float32)
    quantizer = Quantizer.fit(vectors, m, seed, opq_iterations, threads=threads)
    codes = np.concatenate(
        [quantizer.codes(embeddings[s : s + 65536]) for s in range(0, len(embeddings), 65536)]
    )
    return quantizer, codes


def write_codes(
    directory: Path, quantizer: Quantizer, codes: np.ndarray, **more: np.ndarray
) -> None:
    """`directory`/codes.safetensors: the quantizer, the (N, M) codes and `more` tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {**quantizer.tensors(), "codes": np.asarray(codes, dtype=np.uint8), **more}
    atomic_write(directory / CODES_FILE, lambda tmp: save_file(tensors, tmp))


def load_codes(
    directory: Path, card: Mapping[str, Any], phrases: list[str], encode: Encode | None
) -> tuple[CodedPhraseBank, str]:
    """A coded bank's search over `phrases` (read and counted by the caller), re-embedding
    with `encode` (None: the installed encoder, `auto` precision), and its codes' sha256."""
    tensors, digest = read_codes(
        directory / CODES_FILE, QUANTIZER_TENSORS + ("codes",), card.get("weights_sha256")
    )
    rescore = card.get("rescore", RESCORE)
    if not isinstance(rescore, int) or isinstance(rescore, bool) or rescore < 1:
        raise CheckpointError(f"{directory / CARD_FILE}: rescore must be a positive integer")
    quantizer = Quantizer(tensors["rotation"], tensors["centroids"])
    if quantizer.rotation.shape[0] != card["encoder"]["dim"]:
        raise CheckpointError(
            f"{directory / CODES_FILE} codes {quantizer.rotation.shape[0]}-dim vectors but "
            f"encoder {card['encoder'].get('name')!r} embeds into {card['encoder']['dim']}"
        )
    try:
        bank = CodedPhraseBank(
            phrases, quantizer, tensors["codes"], encode or installed_encode(), rescore
        )
    except ValueError as exc:
        raise CheckpointError(f"phrase bank {directory}: {exc}") from None
    return bank, digest


def save_codes(
    directory: Path, quantizer: Quantizer, codes: np.ndarray, keys: np.ndarray, card: dict[str, Any]
) -> Path:
    """compress-bank's output: the quantizer, codes and keys, and a card (`card` merged in)."""
    write_codes(directory, quantizer, codes, keys=keys)
    card = {
        "format": CARD_FORMAT,
        "kind": CODES_KIND,
        "phrase_count": len(codes),
        "m": quantizer.m,
        "codes_sha256": sha256_file(directory / CODES_FILE),
        **card,
    }
    write_card(directory, card)
    return directory


def read_codes(
    path: Path, names: Sequence[str], sha256: str | None
) -> tuple[dict[str, np.ndarray], str]:
    """The tensors `names` of a codes file, checked against the sha256 its card names (None:
    any), and the file's sha256."""
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(f"{path} lacks the tensors {missing}; has {sorted(tensors)}")
    digest = sha256_file(path)
    if sha256 is not None and sha256 != digest:
        raise CheckpointError(
            f"{path} has sha256 {digest} but {CARD_FILE} names {sha256}: the codes are not "
            "the ones the card describes"
        )
    codes, rotation, centroids = tensors["codes"], tensors["rotation"], tensors["centroids"]
    if (
        codes.dtype != np.uint8
        or codes.ndim != 2
        or centroids.shape[:2] != (codes.shape[1], CENTROIDS)
    ):
        raise CheckpointError(
            f"{path}: codes must be (phrases, M) uint8 with (M, 256, D/M) centroids; got "
            f"{codes.dtype} {codes.shape} and {centroids.shape}"
        )
    if rotation.shape != (centroids.shape[0] * centroids.shape[2],) * 2:
        raise CheckpointError(f"{path}: rotation {rotation.shape} does not match the centroids")
    return tensors, digest


def load_shipped(directory: Path) -> tuple[Quantizer, np.ndarray, np.ndarray, dict[str, Any]]:
    """compress-bank's output: (quantizer, codes, keys, card)."""
    try:
        card = json.loads((directory / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {directory / CARD_FILE}: {exc}") from exc
    if card.get("kind") != CODES_KIND:
        raise CheckpointError(f"{directory} holds {card.get('kind')!r}, not {CODES_KIND!r}")
    names = (*QUANTIZER_TENSORS, "codes", "keys")
    tensors, _ = read_codes(directory / CODES_FILE, names, card.get("codes_sha256"))
    if tensors["keys"].shape != (len(tensors["codes"]),):
        raise CheckpointError(f"{directory / CODES_FILE}: one key a code needed")
    quantizer = Quantizer(tensors["rotation"], tensors["centroids"])
    return quantizer, tensors["codes"], tensors["keys"], card


def codes_for(
    texts: Sequence[str], quantizer: Quantizer, codes: np.ndarray, keys: np.ndarray,
    encode: Encode, chunk: int = 1024,
) -> tuple[np.ndarray, int]:  # fmt: skip
    """Each text's codes: the shipped one under its key (a key two shipped codes share is
    nobody's), else its embedding (`encode`) quantised here. Returns (codes, how many were
    embedded)."""
    unique, counts = np.unique(keys, return_counts=True)
    single = unique[counts == 1]
    position = {int(key): row for row, key in enumerate(keys.tolist())}
    mine = text_keys(texts)
    known = np.isin(mine, single)
    out = np.empty((len(texts), quantizer.m), dtype=np.uint8)
    out[known] = codes[[position[int(key)] for key in mine[known].tolist()]]
    missing = np.flatnonzero(~known)
    for start in range(0, len(missing), chunk):
        rows = missing[start : start + chunk]
        out[rows] = quantizer.codes(encode([texts[r] for r in rows]))
    return out, len(missing)
