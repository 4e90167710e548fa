"""Phrase banks: the retrieval decoder. A bank holds phrases with their sentence embeddings; an
embedding decodes to the phrases whose embeddings are nearest by cosine similarity, found by
exact search (one matrix product, then `torch.topk`).

A bank checkpoint is a directory of three files:

- `card.json`: format, `kind: "phrase_bank"`, name, version, encoder {name, dim,
  weights_sha256}, phrase_count, dtype, weights_sha256 (of the embeddings file),
  phrases_sha256, and where the phrases came from (`source`);
- `embeddings.safetensors`: one tensor, `embeddings`, (phrase_count, dim) float16 or float32,
  each row L2-normalised;
- `phrases.json`: the phrases as a JSON list of strings (UTF-8); row i embeds phrases[i]. JSON
  keeps any text intact, newlines included.

A coded bank (`dtype: "opq"`, model/coded_bank.py) keeps `codes.safetensors`, 32 bytes a
phrase, in place of the embeddings, and re-embeds the candidates its codes find.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import (
    CARD_FILE,
    CARD_FORMAT,
    PHRASE_BANK_KIND,
    CheckpointError,
    atomic_write,
    read_card,
    resolve_device,
    write_card,
)
from .coded_bank import CODED, CODES_FILE, RESCORE, Quantizer, load_codes, write_codes
from .encoder import ENCODER_DIM, ENCODER_NAME, ENCODER_WEIGHTS_SHA256, Encode, sha256_file

EMBEDDINGS_FILE = "embeddings.safetensors"
PHRASES_FILE = "phrases.json"
EMBEDDINGS_TENSOR = "embeddings"
#: How a bank's embeddings may be stored.
STORAGE_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float16": torch.float16, "float32": torch.float32}
)
#: The encoder RET decodes, so a bank and a RET model answer the same embeddings.
BANK_ENCODER: Mapping[str, Any] = MappingProxyType(
    {"name": ENCODER_NAME, "dim": ENCODER_DIM, "weights_sha256": ENCODER_WEIGHTS_SHA256}
)
# A stored row's norm may differ from 1 by float16 rounding (about 1e-3), not more.
NORM_TOLERANCE = 1e-2


class Searchable(Protocol):
    """What serves a bank: its phrases and a search (`PhraseBank`, coded_bank's
    `CodedPhraseBank`)."""

    phrases: list[str]
    max_bytes: int

    def __len__(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class PhraseBank:
    """Phrases and their unit-length embeddings on a device, searched exactly.

    >>> bank = PhraseBank(["yes", "no"], torch.eye(2))
    >>> scores, rows = bank.search(torch.tensor([[3.0, 1.0]]), k=2)
    >>> rows.tolist(), [round(s, 4) for s in scores[0].tolist()]
    ([[0, 1]], [0.9487, 0.3162])
    """

    def __init__(self, phrases: Sequence[str], embeddings: torch.Tensor) -> None:
        if embeddings.ndim != 2 or embeddings.shape[0] != len(phrases):
            raise ValueError(
                f"{len(phrases)} phrases need a ({len(phrases)}, dim) matrix, "
                f"got shape {tuple(embeddings.shape)}"
            )
        self.phrases = list(phrases)
        self.embeddings = embeddings
        self.max_bytes = max((len(p.encode()) for p in self.phrases), default=0)

    def __len__(self) -> int:
        return len(self.phrases)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.dtype

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `k` nearest phrases of each query row (queries need not be unit length):
        (scores, rows), both (len(queries), min(k, len(self))), best first. Scores are cosine
        similarities in float32; a zero query scores 0 against every phrase."""
        matrix = self.embeddings
        unit = F.normalize(queries.to(matrix.device, torch.float32), dim=1).to(matrix.dtype)
        scores = unit @ matrix.T
        top = torch.topk(scores, min(k, len(self)), dim=1, sorted=True)
        return top.values.float(), top.indices


@dataclass(frozen=True)
class LoadedPhraseBank:
    """A phrase bank ready to search, with where it came from."""

    bank: Searchable
    card: dict[str, Any]
    sha256: str  # of the embeddings (or codes) file
    path: Path

    @property
    def name(self) -> str:
        return str(self.card.get("name") or self.path.name)

    @property
    def version(self) -> str:
        return str(self.card["version"])

    @property
    def encoder(self) -> str:
        return str(self.card["encoder"]["name"])


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def phrases_json(phrases: Sequence[str]) -> bytes:
    return (json.dumps(list(phrases), ensure_ascii=False, indent=0) + "\n").encode("utf-8")


def save_phrase_bank(
    directory: str | Path,
    phrases: Sequence[str],
    embeddings: np.ndarray | torch.Tensor,
    *,
    name: str,
    version: str = "1",
    dtype: str = "float16",
    encoder: Mapping[str, Any] = BANK_ENCODER,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write a phrase-bank checkpoint: row i of `embeddings` embeds `phrases[i]`. Rows are
    L2-normalised here and stored as `dtype` (float16 or float32). Returns the directory."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    phrases = list(phrases)
    for index, phrase in enumerate(phrases):
        if not isinstance(phrase, str):
            raise ValueError(f"phrases[{index}]: expected a str, got {type(phrase).__name__}")
    matrix = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    if matrix.ndim != 2 or matrix.shape[0] != len(phrases):
        raise ValueError(
            f"embeddings: {len(phrases)} phrases need a ({len(phrases)}, {encoder['dim']}) "
            f"matrix, got shape {tuple(matrix.shape)}"
        )
    if not phrases:
        raise ValueError("phrases: empty; a bank needs at least one phrase")
    if matrix.shape[1] != encoder["dim"]:
        raise ValueError(
            f"embeddings: rows have {matrix.shape[1]} values but encoder {encoder['name']!r} "
            f"embeds into {encoder['dim']}"
        )
    bad = ~torch.isfinite(matrix).all(dim=1)
    if bad.any():
        raise ValueError(f"embeddings: row {int(bad.nonzero()[0])} holds NaN or Inf")
    zero = matrix.norm(dim=1) == 0
    if zero.any():
        raise ValueError(f"embeddings: row {int(zero.nonzero()[0])} is all zeros")
    stored = F.normalize(matrix, dim=1).to(STORAGE_DTYPES[dtype]).contiguous()

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(
        directory / EMBEDDINGS_FILE,
        lambda tmp: save_file({EMBEDDINGS_TENSOR: stored}, tmp, metadata={"format": "pt"}),
    )
    return _write_phrases_and_card(
        directory, phrases, EMBEDDINGS_FILE, name=name, version=version,
        encoder=dict(encoder), dtype=dtype, source=dict(source or {}),
    )  # fmt: skip


def _write_phrases_and_card(
    directory: Path, phrases: Sequence[str], stored: str, **fields: Any
) -> Path:
    """phrases.json and card.json beside the `stored` file (the embeddings or the codes,
    written first): the card names `fields`, the count and both files' sha256."""
    data = phrases_json(phrases)
    atomic_write(directory / PHRASES_FILE, lambda tmp: Path(tmp).write_bytes(data))
    card = {
        "format": CARD_FORMAT,
        "kind": PHRASE_BANK_KIND,
        **fields,
        "phrase_count": len(phrases),
        "weights_sha256": sha256_file(directory / stored),
        "phrases_sha256": _sha256_bytes(data),
    }
    write_card(directory, card)
    return directory


def read_phrases(path: Path) -> tuple[list[str], int]:
    """The phrases of a UTF-8 text file, one per line (without its line break): blank lines
    are skipped and a phrase seen before is dropped, so a bank never lists one twice. Returns
    the phrases in file order and how many repeats were dropped."""
    seen: dict[str, None] = {}
    repeats = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if line in seen:
            repeats += 1
        seen[line] = None
    return list(seen), repeats


def embed_phrases(
    phrases: Sequence[str],
    encode: Callable[[Sequence[str]], np.ndarray],
    chunk_size: int = 1024,
    progress: bool = True,
) -> np.ndarray:
    """`encode` (a sentence encoder) over the phrases, `chunk_size` at a time, with a
    progress bar: (len(phrases), dim) float32, row i embedding phrases[i]."""
    from tqdm import tqdm

    parts = []
    with tqdm(total=len(phrases), desc="embed phrases", unit="phrase", disable=not progress) as bar:
        for start in range(0, len(phrases), chunk_size):
            chunk = phrases[start : start + chunk_size]
            parts.append(np.asarray(encode(chunk), dtype=np.float32))
            bar.update(len(chunk))
    return np.concatenate(parts) if parts else np.zeros((0, ENCODER_DIM), np.float32)


def read_bank_card(path: Path) -> dict[str, Any]:
    """A phrase bank's card.json, checked: its kind, version, encoder and phrase count."""
    card = read_card(path)
    kind = card.get("kind")
    if kind != PHRASE_BANK_KIND:
        raise CheckpointError(f"{path} describes a {kind or 'ret'!r} model, not a phrase bank")
    for key in ("version", "encoder", "phrase_count"):
        if key not in card:
            raise CheckpointError(f"{path} lacks the key {key!r}")
    encoder = card["encoder"]
    if not isinstance(encoder, dict) or not isinstance(encoder.get("dim"), int):
        raise CheckpointError(f"{path}: encoder must be an object with an integer 'dim'")
    return card


def read_phrases_json(path: Path, card: Mapping[str, Any]) -> list[str]:
    try:
        data = path.read_bytes()
        phrases = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
        raise CheckpointError(f"{path} must hold a JSON list of strings")
    digest = _sha256_bytes(data)
    if card.get("phrases_sha256", digest) != digest:
        raise CheckpointError(
            f"{path} has sha256 {digest} but {CARD_FILE} names {card['phrases_sha256']}: "
            "the phrases are not the ones the card describes"
        )
    return phrases


def _read_embeddings(path: Path, card: Mapping[str, Any]) -> tuple[torch.Tensor, str]:
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if set(tensors) != {EMBEDDINGS_TENSOR}:
        raise CheckpointError(
            f"{path} must hold exactly one tensor, {EMBEDDINGS_TENSOR!r}; has {sorted(tensors)}"
        )
    matrix = tensors[EMBEDDINGS_TENSOR]
    if matrix.dtype not in STORAGE_DTYPES.values():
        raise CheckpointError(
            f"{path}: {EMBEDDINGS_TENSOR!r} has dtype {matrix.dtype}; expected float16 or float32"
        )
    dim = card["encoder"]["dim"]
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise CheckpointError(
            f"{path}: {EMBEDDINGS_TENSOR!r} has shape {tuple(matrix.shape)}; expected "
            f"(phrases, {dim}) for encoder {card['encoder'].get('name')!r}"
        )
    digest = sha256_file(path)
    if card.get("weights_sha256", digest) != digest:
        raise CheckpointError(
            f"{path} has sha256 {digest} but {CARD_FILE} names {card['weights_sha256']}: "
            "the embeddings are not the ones the card describes"
        )
    return matrix, digest


def _check_rows(matrix: torch.Tensor, path: Path) -> None:
    """Every row finite and of unit length: cosine similarity is then one dot product."""
    rows = matrix.float()
    bad = ~torch.isfinite(rows).all(dim=1)
    if bad.any():
        raise CheckpointError(f"{path}: row {int(bad.nonzero()[0])} holds NaN or Inf")
    off = (rows.norm(dim=1) - 1).abs() > NORM_TOLERANCE
    if off.any():
        row = int(off.nonzero()[0])
        raise CheckpointError(
            f"{path}: row {row} has norm {float(rows[row].norm()):.4f}; the rows must be "
            "L2-normalised (norm 1)"
        )


def save_coded_bank(
    directory: str | Path,
    phrases: Sequence[str],
    quantizer: Quantizer,
    codes: np.ndarray,
    *,
    name: str,
    source: Mapping[str, Any] | None = None,
    rescore: int = RESCORE,
) -> Path:
    """Write a coded phrase bank (coded_bank): row i of `codes` codes phrases[i]'s embedding."""
    directory = Path(directory)
    write_codes(directory, quantizer, codes)
    return _write_phrases_and_card(
        directory, phrases, CODES_FILE, name=name, version="1", encoder=dict(BANK_ENCODER),
        dtype=CODED, rescore=rescore, source=dict(source or {}),
    )  # fmt: skip


def _counted(directory: Path, card: Mapping[str, Any], phrases: list[str]) -> list[str]:
    """`phrases`, checked: as many as the bank's card names, at least one."""
    if card["phrase_count"] != len(phrases):
        raise CheckpointError(
            f"phrase bank {directory}: {CARD_FILE} names {card['phrase_count']!r} phrases "
            f"but {PHRASES_FILE} holds {len(phrases)}"
        )
    if not phrases:
        raise CheckpointError(f"phrase bank {directory} holds no phrase")
    return phrases


def load_phrase_bank(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    encode: Encode | None = None,
) -> LoadedPhraseBank:
    """Load and check a phrase-bank directory; `dtype` None keeps the stored dtype. A coded
    bank (coded_bank) searches on the CPU and re-embeds with `encode` (None: the installed
    sentence encoder)."""
    directory = Path(directory)
    device = resolve_device(device) if isinstance(device, str) else device
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not (directory / CARD_FILE).is_file():
        raise CheckpointError(f"phrase bank {directory} is missing {CARD_FILE}")
    card = read_bank_card(directory / CARD_FILE)  # first: a checkpoint of another kind says so
    coded = card.get("dtype") == CODED
    for required in (CODES_FILE if coded else EMBEDDINGS_FILE, PHRASES_FILE):
        if not (directory / required).is_file():
            raise CheckpointError(f"phrase bank {directory} is missing {required}")
    if coded:
        phrases = _counted(directory, card, read_phrases_json(directory / PHRASES_FILE, card))
        bank, digest = load_codes(directory, card, phrases, encode)
        return LoadedPhraseBank(bank, card, digest, directory)
    matrix, digest = _read_embeddings(directory / EMBEDDINGS_FILE, card)
    phrases = read_phrases_json(directory / PHRASES_FILE, card)
    if len(phrases) != matrix.shape[0]:
        raise CheckpointError(
            f"phrase bank {directory}: {PHRASES_FILE} holds {len(phrases)} phrases but "
            f"{EMBEDDINGS_FILE} has {matrix.shape[0]} rows; row i must embed phrase i"
        )
    _counted(directory, card, phrases)
    _check_rows(matrix, directory / EMBEDDINGS_FILE)
    matrix = matrix.to(device=device, dtype=dtype or matrix.dtype).contiguous()
    return LoadedPhraseBank(PhraseBank(phrases, matrix), card, digest, directory)
