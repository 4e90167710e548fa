"""Fit an editor's learnt pick (model/pick.py) on pools of training texts it never trained on.

    python -m retd.model.fit_pick CHECKPOINT --pools POOLS.jsonl --out PICK.json
        [--data-dir build/data] [--per-source 150] [--seed 11] [--max-pools 0] [--exclude-shards 50]
        [--exclude-queries 5:100000] [--k 16] [--consensus 0.005] [--decoder rp=1.5,rpn=2,eos=-3]
        [--max-prefix 64] [--encoder-precision auto] [--steps 300] [--l2 0.1] [--threads 2]

1. Pools (resumable, one JSON line a text): `--per-source` texts of every source's training
   split, drawn with `--seed`, less the editor's own training texts, each searched against the
   whole embedded split with its own row left out (so its nearest is another text, as for a
   caller's sentence) and edited as a bank's editor does (unset, `EditSettings`' defaults), in
   an order drawn with the seed: `--max-pools N` builds and fits on the first N only. The
   shipped editor trained on the first 50 shards of `retd embed`'s seeded order (pointer.1's
   datastore: `--exclude-shards 50`) and seed 5's 100,000 queries (pointer.2: `--exclude-queries
   5:100000`); a fitted pick must not learn from texts the editor saw.
2. Features and targets: FEATURES of each candidate, its sentence chrF / 100 against the text.
3. The fit (`pick.fit`, from the rule without weights) and a 5-fold cross-validation of it:
   mean sentence chrF of the learnt pick against the rule's, on the folds it did not see.
`--out` gets {"weights": ..., "pools", "cross_validated", "command"}: `retd add-editor BANK
CHECKPOINT --pick PICK.json`, or the checkpoint card's "pick" entry (the default `--pick card`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retd.model.decoding_eval import consensus_scores
from retd.model.embed import SHARD_SIZE, shard_order
from retd.model.encoder import PRECISIONS
from retd.model.pick import fit, learnt_scores, pool_features, served_weights
from retd.model.retrieve_edit import EditSettings, degenerate_edits

EDIT = EditSettings()


def source_ranges(corpus_dir: Path) -> Iterator[tuple[str, int, int]]:
    """(source, first line, end) of each source's lines in train.txt (corpus.json's counts, in
    the order `retd corpus` writes them)."""
    start = 0
    for name, counts in json.loads((corpus_dir / "corpus.json").read_text())["sources"].items():
        yield name, start, start + counts["train"]
        start += counts["train"]


def editor_seen(
    n: int, exclude_shards: int, exclude_queries: Sequence[tuple[int, int]]
) -> np.ndarray:
    """(n,) bool: the training lines an editor trained on (the first `exclude_shards` shards of
    the seeded order; each (seed, count) of `neighbour_prefix --queries`' draws)."""
    seen = np.zeros(n, dtype=bool)
    for k in shard_order((n + SHARD_SIZE - 1) // SHARD_SIZE)[:exclude_shards]:
        seen[k * SHARD_SIZE : (k + 1) * SHARD_SIZE] = True
    for seed, count in exclude_queries:
        seen[np.random.default_rng(seed).permutation(n)[:count]] = True
    return seen


def chosen_lines(
    corpus_dir: Path, seen: np.ndarray, per_source: int, seed: int
) -> list[tuple[int, str]]:
    """(line, source): `per_source` unseen training lines of every source, drawn with `seed`,
    in an order drawn with it too (so that any first N hold every source alike)."""
    rng = np.random.default_rng(seed)
    chosen: list[tuple[int, str]] = []
    for name, start, end in source_ranges(corpus_dir):
        if end == start:  # a source held out whole (ood)
            continue
        lines = np.arange(start, end)
        chosen += [(int(i), name) for i in rng.permutation(lines[~seen[lines]])[:per_source]]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def build_pools(args: argparse.Namespace, settings: EditSettings) -> set[int]:
    """Step 1: append each chosen text's pool to `args.pools` (skipping those there; the first
    `args.max_pools` only, when set), edited with `settings` (the pick's weights play no part in
    a pool). Returns the lines of the pools to fit on."""
    from retd.model.checkpoint import load_checkpoint
    from retd.model.embed import load_split
    from retd.model.encoder import SentenceEncoder
    from retd.model.evaluate import nearest_k
    from retd.model.retrieve_edit import Editor

    train = load_split(args.data_dir, "train")
    n = sum(1 for _ in (args.data_dir / "corpus" / "train.txt").open(encoding="utf-8"))
    if len(train.texts) != n:
        raise SystemExit(
            f"fit_pick: {len(train.texts)} of {n} training texts are embedded; "
            "run retd embed (make datastore) to the end first"
        )
    seen = editor_seen(n, args.exclude_shards, args.exclude_queries)
    done = set()
    if args.pools.exists():
        done = {json.loads(line)["line"] for line in args.pools.open(encoding="utf-8")}
    chosen = chosen_lines(args.data_dir / "corpus", seen, args.per_source, args.seed)
    chosen = chosen[: args.max_pools or None]
    todo = [(i, s) for i, s in chosen if i not in done]
    print(f"fit_pick: {len(done)} pools there, {len(todo)} to build", flush=True)
    wanted = {i for i, _ in chosen}
    if not todo:
        return wanted
    loaded = load_checkpoint(args.checkpoint)
    encode = SentenceEncoder.load(precision=settings.encoder).encode
    editor = Editor.of(loaded.model, loaded.tokenizer, encode, settings)
    rows = np.array([i for i, _ in todo], dtype=np.int64)
    asked = train.embeddings[rows].astype(np.float32)
    found, sims = nearest_k(asked, train.embeddings, settings.k, own=rows, chunk=256)
    started = time.perf_counter()
    args.pools.parent.mkdir(parents=True, exist_ok=True)
    for at in range(0, len(todo), 50):
        part = slice(at, at + 50)
        neighbours = [[train.texts[j] for j in row] for row in found[part].tolist()]
        pools = editor.pools(asked[part], neighbours, sims[part])
        with args.pools.open("a", encoding="utf-8") as out:
            for q, (line, source) in enumerate(todo[part]):
                out.write(
                    json.dumps(
                        {
                            "line": line,
                            "source": source,
                            "ref": train.texts[line],
                            "edits": pools.edits[q],
                            "neighbours": pools.neighbours[q],
                            "cosine": [round(float(c), 6) for c in pools.cosine[q]],
                        }
                    )
                    + "\n"
                )
        took = time.perf_counter() - started
        print(f"fit_pick: {min(at + 50, len(todo))}/{len(todo)} pools, {took:.0f} s", flush=True)
    return wanted


def featurise(pools: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Step 2: features (P, 2K, F), degenerate edits (P, 2K) and targets (P, 2K)."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    features, dropped, target = [], [], []
    for pool in pools:
        texts = pool["edits"] + pool["neighbours"]
        agreed = consensus_scores(texts)
        features.append(pool_features(pool["edits"], pool["neighbours"], pool["cosine"], agreed))
        dropped.append(degenerate_edits(pool["edits"], pool["neighbours"]))
        target.append([chrf.sentence_score(t, [pool["ref"]]).score / 100 for t in texts])
    return {
        "features": np.array(features),
        "dropped": np.array(dropped, dtype=bool),
        "target": np.array(target),
    }


def chosen_target(data: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """(P,) the target of each pool's pick under `weights` (degenerate edits never picked)."""
    scores = np.where(data["dropped"], -np.inf, learnt_scores(data["features"], weights))
    return data["target"][np.arange(len(scores)), scores.argmax(axis=1)]


def cross_validate(
    data: dict[str, np.ndarray], start: dict[str, float], args: argparse.Namespace, folds: int = 5
) -> dict[str, float]:
    """Step 3's check: mean sentence chrF of the fitted pick and of `start` on unseen folds."""
    fold = np.random.default_rng(0).permutation(len(data["target"])) % folds
    learnt = np.zeros(len(fold))
    for f in range(folds):
        part = {k: v[fold != f] for k, v in data.items()}
        w = fit(part["features"], part["dropped"], part["target"], start, args.steps, l2=args.l2)
        learnt[fold == f] = chosen_target({k: v[fold == f] for k, v in data.items()}, w)
    return {
        "learnt_chrf": round(100 * float(learnt.mean()), 2),
        "rule_chrf": round(100 * float(chosen_target(data, start).mean()), 2),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m retd.model.fit_pick", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("checkpoint", type=Path, help="the editor (a RET checkpoint)")
    ap.add_argument("--pools", type=Path, required=True, help="the pools, JSON lines (resumed)")
    ap.add_argument("--out", type=Path, required=True, help="write the fitted pick here")
    ap.add_argument("--data-dir", type=Path, default=Path("build/data"))
    ap.add_argument("--per-source", type=int, default=150)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--max-pools", type=int, default=0, help="the first N drawn only (0: all)")
    ap.add_argument("--exclude-shards", type=int, default=50)
    ap.add_argument("--exclude-queries", default="5:100000", help="SEED:COUNT,... ('' for none)")
    # Unset, each editing setting is what a bank's editor uses (EditSettings').
    ap.add_argument("--k", type=int, default=EDIT.k)
    ap.add_argument("--consensus", type=float, default=EDIT.consensus, help="the rule fitted from")
    ap.add_argument("--decoder", default=EDIT.decoder)
    ap.add_argument("--max-prefix", type=int, default=EDIT.max_prefix)
    ap.add_argument("--encoder-precision", choices=PRECISIONS, default=EDIT.encoder)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--l2", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        args.exclude_queries = [
            tuple(int(x) for x in part.split(":", 1))
            for part in args.exclude_queries.split(",")
            if part
        ]
    except ValueError:
        ap.error(f"--exclude-queries must be SEED:COUNT,...; got {args.exclude_queries!r}")
    if args.per_source < 1 or args.steps < 1 or args.max_pools < 0:
        ap.error(
            f"--per-source and --steps must be at least 1 and --max-pools at least 0: "
            f"{args.per_source}, {args.steps}, {args.max_pools}"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    given = (args.k, args.consensus, args.decoder, args.max_prefix)
    settings = EditSettings(*given, encoder=args.encoder_precision)
    wanted = build_pools(args, settings)
    pools = [p for p in map(json.loads, args.pools.open(encoding="utf-8")) if p["line"] in wanted]
    data = featurise(pools)
    start = served_weights(args.consensus)
    checked = cross_validate(data, start, args)
    weights = fit(data["features"], data["dropped"], data["target"], start, args.steps, l2=args.l2)
    command = " ".join(["python -m retd.model.fit_pick", *(argv or sys.argv[1:])])
    result = {
        "weights": weights,
        "pools": len(pools),
        "cross_validated": checked,
        "command": command,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
