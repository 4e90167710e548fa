"""The sentence encoder, packed small enough to travel to a lent GPU machine in a few calls.

    python -m retd.model.carry pack --out build/carry --chunk-mb 43 51 --corpus build/data/corpus
    python -m retd.model.carry unpack DIR/encoder.npz.* --out ENCODER_DIR    # on the GPU

A device call carries 64 MiB and all-mpnet-base-v2's float32 weights are 438 MB. Packed, every
matrix is int8 with a float16 scale (absmax / 127) for each 32 weights of a row, and every
vector float16: 106 MiB compressed, cut into chunks that travel in separate calls (one warm
machine keeps what the earlier ones left) and are joined there. `unpack` writes a model
directory of float32 weights again, the rounding kept, with `carried.json` saying so;
`SentenceEncoder.load` takes such a directory through `RETD_ENCODER_DIR` where the upstream
weights are not installed, and reports the copy's hash as its `weights_sha256`.

It is for embedding a training corpus where the upstream weights cannot go, not for serving:
on 300 held-out texts its embeddings keep cosine >= 0.9997 to the upstream float32 ones
(mean 0.99988: `python -m retd.model.carry check DIR TEXTS`), less than the 0.9985 that
training's own embedding noise leaves; but one very short text known to be fragile ("Then
isn't it?", which bfloat16 moved to 0.987) goes to 0.949, where the CPU's fast path stays at
0.999 or more.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retd.model.encoder import CARRIED_MARKER

GROUP = 32  # weights a float16 scale: one a row left some texts below cosine 0.999
# The model directory's small files that travel inside the packed archive.
SMALL_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)


def quantize(weight: np.ndarray, group: int = GROUP) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights (R, C) and a float16 scale (absmax / 127) for each run of `group` weights
    of a row (R, C / group): weight ≈ q * scale per group. A row not made of whole groups is
    one group."""
    rows, cols = weight.shape
    size = group if cols % group == 0 else cols
    runs = weight.reshape(rows, cols // size, size)
    exact = np.abs(runs).max(axis=2) / 127
    scale = exact.astype(np.float16)
    # Rounded up where float16 rounded it down (tiny weights, float16's subnormals): else the
    # largest weight needs more than 127 steps, is clipped, and misses by more than half a step.
    low = scale.astype(np.float32) < exact
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    scale = np.maximum(scale, np.float16(1e-7))  # all-zero runs (a padding row)
    q = np.clip(np.rint(runs / scale[:, :, None].astype(np.float32)), -127, 127)
    return q.astype(np.int8).reshape(rows, cols), scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    rows, cols = q.shape
    runs = q.reshape(rows, scale.shape[1], -1).astype(np.float32)
    return (runs * scale[:, :, None].astype(np.float32)).reshape(rows, cols)


def pack(model_dir: Path) -> bytes:
    """The encoder in `model_dir` as one .npz archive: int8 matrices, float16 vectors."""
    from safetensors.numpy import load_file

    arrays: dict[str, np.ndarray] = {}
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        if tensor.ndim == 2 and tensor.dtype == np.float32:
            arrays[f"q8:{name}"], arrays[f"s8:{name}"] = quantize(tensor)
        elif tensor.dtype == np.float32:
            arrays[f"f16:{name}"] = tensor.astype(np.float16)
        else:
            arrays[f"raw:{name}"] = tensor
    for small in SMALL_FILES:
        if (model_dir / small).exists():
            arrays[f"file:{small}"] = np.frombuffer((model_dir / small).read_bytes(), np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def write_chunks(data: bytes, out: Path, chunk_mb: Sequence[float]) -> list[Path]:
    """`out`/call1/encoder.npz.000, call2/encoder.npz.001, ...: one folder for each device call
    to carry, the k-th chunk at most chunk_mb[k] MiB (the last size repeats), to fit what each
    call has room for beside the working tree."""
    paths: list[Path] = []
    start = 0
    while start < len(data):
        size = int(chunk_mb[min(len(paths), len(chunk_mb) - 1)] * 2**20)
        path = out / f"call{len(paths) + 1}" / f"encoder.npz.{len(paths):03d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[start : start + size])
        paths.append(path)
        start += size
    return paths


def write_corpus(corpus_dir: Path, folder: Path) -> Path:
    """`folder`/corpus.tar.xz of a corpus directory (`retd corpus`'s texts and labels)."""
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.tar.xz"
    with tarfile.open(path, "w:xz") as archive:
        archive.add(corpus_dir, arcname="corpus")
    return path


def unpack(chunks: Sequence[Path], out: Path) -> Path:
    """Join the chunks (in name order) and write a float32 model directory at `out`."""
    from safetensors.numpy import save_file

    data = b"".join(p.read_bytes() for p in sorted(chunks, key=lambda p: p.name))
    weights: dict[str, np.ndarray] = {}
    out.mkdir(parents=True, exist_ok=True)
    with np.load(io.BytesIO(data)) as archive:
        for key in archive.files:
            kind, _, name = key.partition(":")
            if kind == "q8":
                weights[name] = dequantize(archive[key], archive[f"s8:{name}"])
            elif kind == "f16":
                weights[name] = archive[key].astype(np.float32)
            elif kind == "raw":
                weights[name] = archive[key]
            elif kind == "file":
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes(archive[key].tobytes())
    save_file(weights, str(out / "model.safetensors"))
    record = {
        "from": "all-mpnet-base-v2, int8 with a float16 scale per 32 weights (retd.model.carry)",
        "packed_sha256": hashlib.sha256(data).hexdigest(),
    }
    (out / CARRIED_MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return out


def check(model_dir: Path, carried: Path, texts: Sequence[str]) -> dict[str, float]:
    """Cosine of the carried encoder's embeddings to the upstream float32 ones."""
    from retd.model.encoder import SentenceEncoder, cosine_rows

    reference = SentenceEncoder(model_dir).encode(texts)
    cosine = cosine_rows(SentenceEncoder(carried).encode(texts), reference)
    return {"texts": len(texts), "min": float(cosine.min()), "mean": float(cosine.mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retd.model.carry", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="the installed encoder -> int8 chunks")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--chunk-mb", type=float, nargs="+", default=[45.0], help="MiB per chunk")
    p.add_argument("--corpus", type=Path, help="also this corpus directory, in the last call")
    u = sub.add_parser("unpack", help="chunks -> a float32 model directory")
    u.add_argument("chunks", type=Path, nargs="+")
    u.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("check", help="cosine of a carried encoder's embeddings to upstream's")
    c.add_argument("carried", type=Path)
    c.add_argument("texts", type=Path, help="a file of texts, one a line")
    c.add_argument("--limit", type=int, default=300)
    args = parser.parse_args(argv)
    from retd.model.encoder import assemble_encoder

    if args.command == "pack":
        paths = write_chunks(pack(assemble_encoder()), args.out, args.chunk_mb)
        if args.corpus is not None:
            paths.append(write_corpus(args.corpus, paths[-1].parent))
        print(f"one folder a device call: {', '.join(str(p) for p in paths)}")
    elif args.command == "unpack":
        print(f"unpacked into {unpack(args.chunks, args.out)}")
    else:
        from retd.model.corpus import read_texts
        from retd.model.evaluate import heldout_rows

        lines = read_texts(args.texts)
        texts = [lines[i] for i in heldout_rows(len(lines), args.limit)]
        print(json.dumps(check(assemble_encoder(), args.carried, texts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
