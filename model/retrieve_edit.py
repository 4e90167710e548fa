"""Retrieve, edit, verify, measured: the model rewrites each of the K nearest training texts,
and the sentence encoder picks the answer among those edits and the neighbours themselves.

    python -m retd.model.retrieve_edit CHECKPOINT [--pointer] [--data-dir build/data] [--k 16]
        [--limit 500] [--per-source 0] [--consensus 0.005] [--decoder rp=1.5,rpn=2,eos=-3]
        [--max-prefix 64] [--encoder-precision auto] [--keep-degenerate] [--pick card]
        [--threads 1] [--no-cache] [--out REPORT.json] [--save-pools POOLS.json]

For each asked embedding: its K nearest embedded training texts (cosine, float32), each cut to
`--max-prefix` tokens and decoded after as a prefix (EOS between, as `neighbour_prefix` trains;
`--pointer` decodes as `PointerRET`, which can copy from it), with `--decoder`'s loop breakers.
The pool is the K edits and the K neighbours; its texts are scored by their cosine to the asked
embedding (an edit's re-encoding by all-mpnet-base-v2 at `--encoder-precision`, a neighbour's
stored embedding), and, with `--consensus W`, W times their mean sentence chrF against the rest
of the pool; the served pick ("served", a bank's answer) also leaves out the edits that add a
run of 4+ equal characters or a " -- " tail their neighbour lacks (`degenerate`;
`--keep-degenerate` lets them be picked). With `--pick card` (the default, as `retd add-editor`)
the served pick is the checkpoint card's learnt one where it has one (model/pick.py: a weighted
sum of each candidate's features), "served_without_weights" beside it the rule it replaces;
`--pick cosine` serves the rule. A pool holds the nearest neighbour, so picking by
cosine never scores a lower cosine than retrieval; chrF and BLEU against the reference are what
the pick does not see. Figures on `--limit` held-out texts evenly spaced (as `retd eval`) and,
with `--per-source N`, on the first N of every source of the held-out and ood splits, each
beside retrieval from the same training texts. Unset, each editing flag but `--pointer` is
`EditSettings`' default, what a bank's editor serves. The report times the search, the decoding
(`--no-cache`: generate's uncached reference path, for comparison) and the encoding. `Editor` is
that decoder as one object (`EditSettings` its settings); a phrase bank with an editor serves it
(model/bank_editor.py, `retd add-editor`).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retd.model.batches import encode_texts
from retd.model.decoding_eval import Decoder, consensus_scores, pool_cosines
from retd.model.encoder import PRECISIONS, Encode
from retd.model.evaluate import measured_texts, nearest_k, text_scores
from retd.model.generation import generate
from retd.model.model import RET
from retd.model.pick import (
    PICK_CHOICES,
    check_weights,
    chosen_weights,
    learnt_scores,
    pool_features,
)
from retd.model.pointer import PointerRET
from retd.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class Pools:
    """Each asked embedding's candidates: K edits then K neighbours, nearest first."""

    edits: list[list[str]]  # (N, K) the model's text after each neighbour
    neighbours: list[list[str]]  # (N, K) the training texts
    cosine: np.ndarray  # (N, 2K) each candidate's cosine to the asked embedding
    seconds: dict[str, float] = field(default_factory=dict)  # search, decode, encode

    def texts(self, row: int) -> list[str]:
        return self.edits[row] + self.neighbours[row]

    def subset(self, rows: Sequence[int]) -> Pools:
        return Pools(
            [self.edits[r] for r in rows], [self.neighbours[r] for r in rows], self.cosine[rows]
        )


@torch.no_grad()
def edit_after(
    model: RET,
    tokenizer: Tokenizer,
    embeddings: torch.Tensor,
    neighbours: Sequence[Sequence[str]],
    decoder: Decoder,
    max_prefix: int = 64,
    batch_size: int = 100,
    use_cache: bool = True,
) -> list[list[str]]:
    """Row i decoded from embeddings[i] after each of neighbours[i] (cut to `max_prefix`
    tokens, then EOS): (N, K) texts, every (row, neighbour) pair batched together, `batch_size`
    pairs a call. `use_cache=False`: generate's reference path."""
    params = decoder.params(model.config.max_length)
    limit, eos = model.config.max_length, model.config.eos_id
    owners = [i for i, row in enumerate(neighbours) for _ in row]
    column = encode_texts([text for row in neighbours for text in row], limit, tokenizer)
    prefixes = [[*tokens[:max_prefix].tolist(), eos] for tokens in column]
    texts: list[str] = []
    device = next(model.parameters()).device
    for start in range(0, len(prefixes), batch_size):
        rows = owners[start : start + batch_size]
        results = generate(
            model, embeddings[rows].to(device), [params] * len(rows), use_cache=use_cache,
            tokenizer=tokenizer, prefixes=prefixes[start : start + batch_size],
        )  # fmt: skip
        texts += [result.text for result in results]
    ends = np.cumsum([len(row) for row in neighbours])
    return [texts[end - len(row) : end] for row, end in zip(neighbours, ends, strict=True)]


@dataclass(frozen=True)
class EditSettings:
    """How an `Editor` edits: what a phrase bank's card keeps under "editor" (bank_editor)."""

    k: int = 16  # neighbours edited per asked embedding
    consensus: float = 0.005  # weight of the pool's agreement (mean sentence chrF)
    decoder: str = "rp=1.5,rpn=2,eos=-3"  # decoding_eval.Decoder's spec
    max_prefix: int = 64  # tokens of a neighbour the model reads
    pointer: bool = True  # decode as PointerRET (it can copy from the neighbour)
    # The re-encoding's precision, SentenceEncoder's: "auto" is "fast" (bfloat16) where that is
    # native, else "float32"; per source the picks are the same (README: A bank with an editor).
    encoder: str = "auto"
    # Edits that add a degenerate run or a dictionary tail their phrase lacks (`degenerate`)
    # are not candidates.
    drop_degenerate: bool = True
    # The learnt pick (model/pick.py): each candidate scored by these weights of its features;
    # empty: cosine + consensus × agreement.
    pick_weights: Mapping[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pick_weights", check_weights(self.pick_weights))
        if self.encoder not in PRECISIONS:
            raise ValueError(f"editor: encoder must be one of {PRECISIONS}, got {self.encoder!r}")
        if self.k < 1 or self.max_prefix < 1 or not self.consensus >= 0:
            raise ValueError(
                f"editor: k and max_prefix must be at least 1 and consensus >= 0, got k "
                f"{self.k}, max_prefix {self.max_prefix}, consensus {self.consensus}"
            )
        Decoder.parse(self.decoder)  # raises ValueError naming the spec

    def pick(self, pools: Pools, agreed: np.ndarray | None = None) -> np.ndarray:
        """What a bank's editor answers from `pools`: `pick` with these settings."""
        return pick(pools, self.consensus, True, self.drop_degenerate, agreed, self.pick_weights)


@dataclass(frozen=True)
class Editor:
    """Retrieve, edit, verify with one model: the K neighbours' edits and the neighbours
    themselves, the answer picked by cosine (+ consensus)."""

    model: RET
    tokenizer: Tokenizer
    encode: Encode
    settings: EditSettings = EditSettings()

    @classmethod
    def of(cls, model: RET, tokenizer: Tokenizer, encode: Encode, settings: EditSettings) -> Editor:
        """`model` as the settings decode it (a PointerRET of its weights with `pointer`)."""
        edits = PointerRET.of(model) if settings.pointer else model
        return cls(edits.eval(), tokenizer, encode, settings)

    def pools(
        self, asked: np.ndarray, neighbours: Sequence[Sequence[str]], cosine: np.ndarray,
        use_cache: bool = True, seconds: dict[str, float] | None = None,
    ) -> Pools:  # fmt: skip
        """The pools of the asked (N, E) embeddings whose K nearest texts are `neighbours`
        (N, K), with their `cosine` (N, K) to the asked; `seconds` gets decode and encode."""
        started = time.perf_counter()
        settings = self.settings
        embeddings = torch.from_numpy(np.asarray(asked, dtype=np.float32))
        edits = edit_after(
            self.model, self.tokenizer, embeddings, neighbours, Decoder.parse(settings.decoder),
            settings.max_prefix, 100, use_cache,
        )  # fmt: skip
        decoded = time.perf_counter()
        edit_cos = np.stack(pool_cosines(edits, embeddings, self.encode))  # (N, K)
        if seconds is not None:
            seconds["decode"] = round(decoded - started, 2)
            seconds["encode"] = round(time.perf_counter() - decoded, 2)
        together = np.concatenate([edit_cos, np.asarray(cosine, dtype=np.float32)], axis=1)
        return Pools(edits, [list(row) for row in neighbours], together, seconds or {})

    def answers(
        self, asked: np.ndarray, neighbours: Sequence[Sequence[str]], cosine: np.ndarray
    ) -> list[tuple[str, float, int, bool]]:
        """Each asked embedding's answer: (text, its cosine, which neighbour (0..K-1) it is
        or edits, whether it is an edit)."""
        pools = self.pools(asked, neighbours, cosine)
        k = len(pools.edits[0]) if pools.edits else 0
        return [
            (pools.texts(r)[c], float(pools.cosine[r, c]), c % k, c < k)
            for r, c in enumerate(self.settings.pick(pools).tolist())
        ]


def build_pools(
    editor: Editor, asked: np.ndarray, bank: np.ndarray, bank_texts: Sequence[str],
    use_cache: bool = True,
) -> Pools:  # fmt: skip
    """The pools of the asked (N, 768) embeddings against a bank (M, 768) of training texts,
    with the seconds each stage took."""
    started = time.perf_counter()
    indices, sims = nearest_k(asked, bank, editor.settings.k, chunk=256)  # (256, M) at a time
    seconds = {"search": round(time.perf_counter() - started, 2)}
    neighbours = [[bank_texts[j] for j in row] for row in indices.tolist()]
    return editor.pools(asked, neighbours, sims, use_cache, seconds)


# What a degenerating edit adds: a run of 4+ equal characters ("........", "wwwww") or a
# dictionary's " -- " tail (GCIDE's "Short for hacker. -- Anni"i*al*ly, adv.").
DEGENERATE = (re.compile(r"(\S)\1{3,}"), re.compile(" -- "))


def degenerate(edit: str, phrase: str) -> bool:
    """Whether `edit` has one of `DEGENERATE`'s patterns that the `phrase` it edits lacks."""
    return any(p.search(edit) is not None and p.search(phrase) is None for p in DEGENERATE)


def degenerate_edits(edits: Sequence[str], neighbours: Sequence[str]) -> list[bool]:
    """(2K,) which of a pool's candidates `degenerate` leaves out: edits only, never a
    neighbour."""
    pairs = zip(edits, neighbours, strict=True)
    return [degenerate(e, n) for e, n in pairs] + [False] * len(neighbours)


def agreement(pools: Pools) -> np.ndarray:
    """(N, 2K) each candidate's mean sentence chrF against the rest of its pool."""
    return np.stack([consensus_scores(pools.texts(r)) for r in range(len(pools.edits))])


def pick(
    pools: Pools, consensus: float = 0.0, edits: bool = True, drop_degenerate: bool = False,
    agreed: np.ndarray | None = None, weights: Mapping[str, float] | None = None,
) -> np.ndarray:  # fmt: skip
    """Each row's chosen candidate (an index into `pools.texts(row)`): the highest cosine,
    plus `consensus` times its mean chrF against the rest of the pool (all 2K texts; `agreed`:
    `agreement(pools)` already computed), or with `weights` the highest learnt score
    (model/pick.py); `edits=False` picks among the neighbours only (the nearest: retrieval),
    `edits=True` from the whole pool, less the `degenerate` edits with `drop_degenerate`."""
    k = len(pools.edits[0]) if pools.edits else 0
    if not edits:
        return np.full(len(pools.edits), k)
    if weights:
        agreed = agreement(pools) if agreed is None else agreed
        scores = np.stack([
            learnt_scores(pool_features(e, n, c, a), weights)
            for e, n, c, a in zip(pools.edits, pools.neighbours, pools.cosine, agreed, strict=True)
        ])  # fmt: skip
    elif consensus:
        agreed = agreement(pools) if agreed is None else agreed
        scores = pools.cosine.astype(np.float64) + consensus * agreed
    else:
        scores = pools.cosine.astype(np.float64)
    if drop_degenerate:
        rows = zip(pools.edits, pools.neighbours, strict=True)
        dropped = [degenerate_edits(e, n) for e, n in rows]
        scores = np.where(np.array(dropped, dtype=bool), -np.inf, scores)
    return scores.argmax(axis=1)


def figures(
    pools: Pools, refs: Sequence[str], settings: EditSettings
) -> dict[str, dict[str, float]]:
    """chrF, BLEU and cosine of retrieval, the first edit, and the picks, against `refs`;
    "served" is the settings' pick, what a bank's editor answers."""
    k = len(pools.edits[0])
    rows = np.arange(len(refs))
    consensus = settings.consensus
    choices = {
        "retrieval": pick(pools, edits=False),
        "edit_of_nearest": np.zeros(len(refs), dtype=int),
        "edits_by_cosine": pools.cosine[:, :k].argmax(axis=1),
        "edits_and_neighbours_by_cosine": pick(pools),
    }
    agreed = agreement(pools) if consensus or settings.pick_weights else None  # slow: once
    if consensus:
        choices[f"edits_and_neighbours_by_cosine_and_{consensus}_consensus"] = pick(
            pools, consensus, agreed=agreed
        )
    if settings.pick_weights:  # the rule the weights replace, beside them
        choices["served_without_weights"] = replace(settings, pick_weights={}).pick(pools, agreed)
    choices["served"] = settings.pick(pools, agreed)
    report: dict[str, dict[str, float]] = {}
    for name, chosen in choices.items():
        scores = text_scores([pools.texts(r)[c] for r, c in enumerate(chosen)], refs)
        report[name] = {
            "chrf": round(scores["chrf"], 2),
            "bleu": round(scores["bleu"], 2),
            "cosine": round(float(pools.cosine[rows, chosen].mean()), 4),
            "edit_share": round(float(np.mean(chosen < k)), 3),
        }
    return report


def run(args: argparse.Namespace, encode: Encode | None = None) -> dict[str, Any]:
    """The figures of the module docstring; `encode` defaults to the installed encoder."""
    from retd.model.checkpoint import load_checkpoint
    from retd.model.embed import load_split

    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.checkpoint)
    if encode is None:
        from retd.model.encoder import SentenceEncoder

        encode = SentenceEncoder.load(precision=args.encoder_precision).encode
    settings = EditSettings(
        args.k, args.consensus, args.decoder, args.max_prefix, args.pointer,
        args.encoder_precision, drop_degenerate=not args.keep_degenerate,
        pick_weights=chosen_weights(args.pick, loaded.card),
    )  # fmt: skip
    editor = Editor.of(loaded.model, loaded.tokenizer, encode, settings)
    # Every text measured, held-out and per source, searched and decoded in one pass.
    groups = measured_texts(args.data_dir, args.limit, args.per_source)
    train = load_split(args.data_dir, "train")
    started = time.perf_counter()
    pools = build_pools(
        editor, np.concatenate([v for _, v in groups.values()]), train.embeddings, train.texts,
        not args.no_cache,
    )  # fmt: skip
    report: dict[str, Any] = {
        "checkpoint": str(args.checkpoint), "pointer": args.pointer, "k": args.k,
        "decoder": args.decoder, "encoder_precision": args.encoder_precision,
        "drop_degenerate": settings.drop_degenerate,
        "bank_texts": len(train.texts),
        "seconds": {**pools.seconds, "all": round(time.perf_counter() - started, 1)},
    }  # fmt: skip
    if args.save_pools:
        args.save_pools.write_text(json.dumps({
            "texts": [t for texts, _ in groups.values() for t in texts],
            "edits": pools.edits, "neighbours": pools.neighbours, "cosine": pools.cosine.tolist(),
        }))  # fmt: skip
    start = 0
    for name, (texts, _) in groups.items():
        part_pools = pools.subset(range(start, start + len(texts)))
        entry = {"texts": len(texts), **figures(part_pools, texts, settings)}
        if name == "heldout":
            report["heldout"] = entry
        else:
            report.setdefault("per_source", {})[name] = entry
        start += len(texts)
    return report


def markdown(report: dict[str, Any]) -> str:
    """The held-out figures as a table, then a per-source table (retrieval / the picks)."""
    lines = ["| pick | chrF | BLEU | cosine | edits picked |", "|---|---:|---:|---:|---:|"]
    for name, f in report.get("heldout", {}).items():
        if isinstance(f, dict):
            lines.append(
                f"| {name} | {f['chrf']} | {f['bleu']} | {f['cosine']} | {f['edit_share']} |"
            )
    if "per_source" in report:
        shown = [
            name
            for name in next(iter(report["per_source"].values()))
            if name in ("retrieval", "served") or name.startswith("edits_and_neighbours")
        ]
        lines += ["", "| source | texts | " + " | ".join(shown) + " |"]
        lines.append("|---|---:|" + "---:|" * len(shown))
        for source, entry in report["per_source"].items():
            cells = [f"{entry[name]['chrf']} / {entry[name]['cosine']}" for name in shown]
            lines.append(f"| {source} | {entry['texts']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


EDIT = EditSettings()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m retd.model.retrieve_edit", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--pointer", action="store_true", help="decode as PointerRET")
    ap.add_argument("--data-dir", type=Path, default=Path("build/data"))
    # Unset, each editing setting but --pointer is what a bank's editor uses (EditSettings').
    ap.add_argument("--k", type=int, default=EDIT.k, help="neighbours edited per text")
    ap.add_argument("--limit", type=int, default=500, help="held-out texts, evenly spaced")
    ap.add_argument("--per-source", type=int, default=0, help="texts of each source (0: none)")
    ap.add_argument("--consensus", type=float, default=EDIT.consensus, help="pool agreement")
    ap.add_argument("--decoder", default=EDIT.decoder)
    ap.add_argument("--max-prefix", type=int, default=EDIT.max_prefix)
    ap.add_argument("--encoder-precision", choices=PRECISIONS, default=EDIT.encoder)
    ap.add_argument(
        "--keep-degenerate", action="store_true", default=not EDIT.drop_degenerate,
        help="let degenerate edits be picked (served)",
    )  # fmt: skip
    ap.add_argument("--pick", default="card", help=f"the served pick's weights: {PICK_CHOICES}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-cache", action="store_true", help="decode without the KV cache")
    ap.add_argument("--out", type=Path, default=None, help="write the report here (JSON)")
    ap.add_argument("--save-pools", type=Path, default=None, help="write every pool here (JSON)")
    args = ap.parse_args(argv)
    if args.k < 1:
        ap.error(f"--k must be at least 1, got {args.k}")
    if args.limit < 1 and args.per_source < 1:
        ap.error("nothing to measure: give --limit or --per-source a positive count")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
