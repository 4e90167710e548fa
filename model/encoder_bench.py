"""How fast `retd embed` encodes, and how close its embeddings stay to the float32 reference.

    python -m retd.model.encoder_bench TEXTS [--limit 1000] [--rounds 2] [--threads 0]

Encodes `limit` texts of TEXTS (evenly spaced lines) with each variant in turn, `rounds`
times interleaved (a noisy machine slows them alike), after a warm-up batch (compilation):
float32 at the old batch of 64, float32 at 32, and `--precision fast` (bfloat16 weights,
torch.compile) at 32. Prints each variant's median texts/s, its ratio to the first, and the
cosine of its embeddings to float32's (min and mean): `retd embed` accepts a faster path only
if every text keeps cosine >= 0.999.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from retd.model.corpus import read_texts
    from retd.model.encoder import SentenceEncoder, cosine_rows
    from retd.model.evaluate import heldout_rows

    parser = argparse.ArgumentParser(prog="python -m retd.model.encoder_bench", description=__doc__)
    parser.add_argument("texts", type=Path, help="a file of texts, one a line")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = read_texts(args.texts)
    rows = heldout_rows(len(lines), args.limit)
    texts = [lines[i] for i in rows]
    reference = SentenceEncoder.load()
    fast = SentenceEncoder.load(precision="fast")
    variants = {"float32, batch 64": (reference, 64), "float32, batch 32": (reference, 32)}
    variants["fast, batch 32"] = (fast, 32)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, np.ndarray] = {}
    for encoder, batch in variants.values():
        encoder.encode(texts[:batch], batch_size=batch)  # warm-up (and compilation)
    for _ in range(args.rounds):
        for name, (encoder, batch) in variants.items():
            start = time.perf_counter()
            outputs[name] = encoder.encode(texts, batch_size=batch)
            rates[name].append(len(texts) / (time.perf_counter() - start))
    base = statistics.median(rates["float32, batch 64"])
    print(f"{len(texts)} texts of {args.texts}, {torch.get_num_threads()} threads")
    print("| variant | texts/s | ratio | cosine to float32: min | mean |")
    print("|---|---:|---:|---:|---:|")
    for name in variants:
        rate = statistics.median(rates[name])
        cosine = cosine_rows(outputs[name], outputs["float32, batch 64"])
        print(
            f"| {name} | {rate:.1f} | {rate / base:.2f}x | {cosine.min():.5f} "
            f"| {cosine.mean():.6f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
