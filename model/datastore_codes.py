"""The datastore that travels: the training split's embeddings as codes (model/coded_bank.py),
committed under model/datastore, from which a fresh clone builds its retrieve-edit-verify bank
in minutes (the corpus, then `--codes`) instead of embedding 951k texts for hours.

    retd compress-bank BANK --out DIR [--m 32] [--sample 100000] [--seed 0] [--opq-iterations 50]
        [--threads 1]
    retd build-phrase-bank --from-split DATA --codes DIR --out BANK

`compress-bank` fits a quantizer on `--sample` of an embedded bank's rows and codes them all,
with each phrase's key; `build-phrase-bank --codes` reads the split's texts (its corpus file:
no embeddings needed) and writes a coded bank of them, each text's shipped codes found by its
key, the texts the codes lack (a corpus rebuilt from newer packages) embedded here.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .checkpoint import CheckpointError
from .coded_bank import (
    codes_for,
    compress,
    installed_encode,
    is_coded,
    load_shipped,
    save_codes,
    text_keys,
)
from .encoder import Encode
from .phrase_bank import PhraseBank, load_phrase_bank, save_coded_bank


def compress_bank(args: argparse.Namespace) -> int:
    """`retd compress-bank`: BANK's embeddings as codes, with keys, in --out."""
    if is_coded(args.bank):  # before loading it, which would load the encoder for nothing
        print(f"retd compress-bank: {args.bank} is coded already", file=sys.stderr)
        return 2
    try:
        loaded = load_phrase_bank(args.bank)
    except CheckpointError as exc:
        print(f"retd compress-bank: {exc}", file=sys.stderr)
        return 2
    assert isinstance(loaded.bank, PhraseBank)  # a bank of stored embeddings: not coded
    try:
        vectors = loaded.bank.embeddings.float().numpy()
        quantizer, codes = compress(
            vectors, args.m, args.sample, args.seed, args.opq_iterations, args.threads
        )
    except ValueError as exc:
        print(f"retd compress-bank: {exc}", file=sys.stderr)
        return 2
    card = {
        "bank": {"name": loaded.name, "phrases_sha256": loaded.card.get("phrases_sha256")},
        "source": loaded.card.get("source", {}),
        "fit": {
            "sample": min(args.sample, len(codes)),
            "seed": args.seed,
            "opq_iterations": args.opq_iterations,
        },
    }
    save_codes(args.out, quantizer, codes, text_keys(loaded.bank.phrases), card)
    summary = {"codes": str(args.out), "phrases": len(codes), "bytes_a_phrase": quantizer.m}
    print(json.dumps(summary, indent=2))
    return 0


def bank_from_codes(args: argparse.Namespace, encode: Encode | None = None) -> int:
    """`retd build-phrase-bank --from-split DATA --codes DIR`: a coded bank of the split's
    texts (`encode` embeds those the codes lack; None: the installed encoder)."""
    from .corpus import read_texts

    data_dir, split = args.from_split, args.split
    path = data_dir / "corpus" / f"{split}.txt"
    try:
        texts = read_texts(path)
    except OSError as exc:
        print(f"retd build-phrase-bank: {exc} (`retd corpus` writes it)", file=sys.stderr)
        return 2
    if not texts:
        print(f"retd build-phrase-bank: {path} holds no text", file=sys.stderr)
        return 2
    try:
        quantizer, codes, keys, card = load_shipped(args.codes)
    except CheckpointError as exc:
        print(f"retd build-phrase-bank: {exc}", file=sys.stderr)
        return 2
    mine, embedded = codes_for(
        texts, quantizer, codes, keys, encode or (lambda batch: installed_encode()(batch))
    )
    source: dict[str, Any] = {
        "data_dir": str(data_dir),
        "split": split,
        "texts": len(texts),
        "codes": str(args.codes),
        "codes_sha256": card.get("codes_sha256"),
        "embedded_here": embedded,
    }
    name = args.name or args.out.name
    out = save_coded_bank(args.out, texts, quantizer, mine, name=name, source=source)
    print(json.dumps({"checkpoint": str(out), "phrases": len(texts), **source}, indent=2))
    return 0
