"""What a running server's Decode answers, scored: `retd eval MODEL --server ADDRESS`.

The held-out texts `retd eval` scores (`--limit` evenly spaced, and with `--per-source N` the
first N of each source of the held-out and ood splits) are sent to the served MODEL as
DecodeBatch calls with every decoding field unset: what a caller who sets nothing gets, whatever
the model is (a RET checkpoint with its card's loop breakers, a phrase bank, a bank with an
editor). Each group is scored by chrF, BLEU and the re-encoded cosine beside the retrieval
baseline (the nearest training text), with which kind of answer came back (generated, phrase,
edit) and the calls' seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retd.model.encoder import Encode
from retd.model.evaluate import measured_texts, reference_scores, retrieval_baseline


def served_answers(
    client: Any, model: str, embeddings: np.ndarray, batch: int = 32
) -> tuple[list[str], Counter[str]]:
    """The served model's Decode of every row (`batch` rows a call) and how many answers
    each source (generated, phrase_bank, edited) gave. A failed item raises its error."""
    texts: list[str] = []
    sources: Counter[str] = Counter()
    for start in range(0, len(embeddings), batch):
        for item in client.decode_batch(embeddings[start : start + batch], model=model):
            result = item.unwrap()
            texts.append(result.text)
            sources[str(result.source)] += 1
    return texts, sources


def evaluate_served(
    client: Any,
    model: str,
    data_dir: Path,
    limit: int = 500,
    per_source: int = 0,
    encode: Encode | None = None,
) -> dict[str, Any]:
    """The module docstring's figures: report["heldout"] and report["per_source"][group],
    each {"decode": ..., "retrieval": ..., "texts": n}."""
    from retd.model.embed import load_split

    if encode is None:
        from retd.model.encoder import SentenceEncoder

        encode = SentenceEncoder.load().encode
    groups = measured_texts(data_dir, limit, per_source)
    train = load_split(data_dir, "train")
    report: dict[str, Any] = {"model": model, "bank_texts": len(train.texts)}
    for name, (refs, embeddings) in groups.items():
        started = time.perf_counter()
        answers, sources = served_answers(client, model, embeddings)
        entry = {
            "texts": len(refs),
            "decode": reference_scores(answers, refs, embeddings, encode),
            "sources": dict(sources),
            "seconds": round(time.perf_counter() - started, 1),
        }
        if train.texts:
            retrieved, _ = retrieval_baseline(embeddings, train.embeddings, train.texts)
            entry["retrieval"] = reference_scores(retrieved, refs, embeddings, encode)
        pairs = zip(refs[:4], answers[:4], strict=True)
        entry["examples"] = [{"reference": r, "decode": a} for r, a in pairs]
        if name == "heldout":
            report["heldout"] = entry
        else:
            report.setdefault("per_source", {})[name] = entry
    return report


def main(args: argparse.Namespace) -> int:
    """`retd eval MODEL --server ADDRESS [--limit N] [--per-source N] [--markdown]`."""
    from retd.client import Client

    with Client(args.server, timeout=3600) as client:
        report = evaluate_served(
            client, str(args.checkpoint), args.data_dir, args.limit, args.per_source
        )
    print(markdown(report) if args.markdown else json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def markdown(report: dict[str, Any]) -> str:
    """One row a group: Decode's and retrieval's chrF / cosine, and who answered."""
    lines = [
        f"| {report['model']} | texts | Decode chrF | BLEU | cosine | retrieval chrF | BLEU | "
        "cosine | answered by |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    groups = {"heldout": report.get("heldout"), **report.get("per_source", {})}
    for name, entry in groups.items():
        if entry is None:
            continue
        d, r = entry["decode"], entry.get("retrieval", {})
        by = ", ".join(f"{k} {v}" for k, v in sorted(entry["sources"].items()))
        cells: Sequence[Any] = (
            name, entry["texts"], d["chrf"], d["bleu"], d["cosine"],
            r.get("chrf", "-"), r.get("bleu", "-"), r.get("cosine", "-"), by,
        )  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
