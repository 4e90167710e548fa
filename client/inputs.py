"""Reading embeddings given on the command line: a ``.npy`` file, a JSON array, or stdin.

>>> read_embeddings("[0.5, 1.5]").tolist()
[0.5, 1.5]
>>> read_embeddings("[[1, 2], [3, 4]]").shape
(2, 2)
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["EmbeddingInputError", "parse_embeddings", "read_embeddings"]

_NPY_MAGIC = b"\x93NUMPY"


class EmbeddingInputError(ValueError):
    """The command line's embedding input cannot be read."""


def parse_embeddings(data: bytes, *, origin: str = "input") -> np.ndarray:
    """``.npy`` bytes or a JSON array as a float32 array of 1 (one embedding) or 2 dimensions."""
    if data.startswith(_NPY_MAGIC):
        try:
            value = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise EmbeddingInputError(f"{origin}: not a readable .npy array ({err})") from err
    else:
        text = data.decode("utf-8", errors="replace").strip()
        if not text:
            raise EmbeddingInputError(f"{origin}: empty, expected a JSON array or .npy data")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise EmbeddingInputError(
                f"{origin}: neither .npy data nor a JSON array ({err})"
            ) from err
    try:
        array = np.asarray(value)
    except ValueError as err:  # ragged nested lists
        raise EmbeddingInputError(f"{origin}: not a rectangular array of numbers") from err
    if array.dtype.kind not in "fiu":
        raise EmbeddingInputError(f"{origin}: expected numbers, got {array.dtype} values")
    if array.ndim not in (1, 2):
        raise EmbeddingInputError(
            f"{origin}: expected one embedding (1-D) or a batch (2-D), "
            f"got shape {list(array.shape)}"
        )
    return array.astype(np.float32, copy=False)


def read_embeddings(source: str | None, stdin: BinaryIO | None = None) -> np.ndarray:
    """The embedding(s) named by a command line argument.

    ``source`` is a path to a ``.npy`` (or JSON) file, a JSON array literal, or ``"-"`` /
    ``None`` to read stdin (``.npy`` bytes or a JSON array). A 2-D result is a batch.
    """
    if source is None or source == "-":
        if stdin is None:
            import sys

            stdin = sys.stdin.buffer
        if source is None and stdin.isatty():
            raise EmbeddingInputError(
                "no EMBEDDING given: pass a .npy path or a JSON array, or pipe one on stdin"
            )
        return parse_embeddings(stdin.read(), origin="stdin")
    if source.lstrip().startswith("["):
        return parse_embeddings(source.encode(), origin="EMBEDDING")
    path = Path(source)
    if not path.is_file():
        raise EmbeddingInputError(f"{source}: no such file (and not a JSON array)")
    return parse_embeddings(path.read_bytes(), origin=source)
