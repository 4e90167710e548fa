"""Retrieve-and-edit, measured: RET trained to decode with its nearest training text before it.

    python -m retd.model.neighbour_prefix OUT [--init CHECKPOINT] [--data-dir build/data]
        [--minutes 50] [--max-steps N] [--neighbour-drop P] [--pointer] [--threads 1] [--seed 5]
        [--eval-only] [--neighbours 1] [--queries 0]

A sequence is the nearest other embedded training text (cosine of the all-mpnet-base-v2
embeddings; bfloat16 products; with `--neighbours K`, one of its K nearest, drawn afresh each
time; `--queries N` trains on N of the texts, drawn with the seed, so only N are searched),
cut to `--max-prefix` tokens, then EOS as a separator, then the text: the loss is on the text
and its EOS only, and every position is conditioned on the text's embedding (RET's forward
unchanged, so no parameter is added). `--neighbour-drop P`
leaves a row's neighbour out with probability P (P = 1: the control, the same fine-tuning with
an empty prefix, evaluated with none). `--pointer` trains and decodes `PointerRET`, which can
also copy the neighbour's tokens (the same parameters). The held-out texts (500 evenly spaced,
as `retd eval`) get their nearest training text the same way. Every `--eval-every` steps:
held-out loss per byte of text and the greedy decode `Decode` makes by default (`--decoder`,
parsed as in `retd.model.decoding_eval`), scored by chrF and BLEU beside retrieval (the
neighbour itself) and, at the end, the re-encoded cosine and chrF by neighbour similarity.
Writes OUT/log.jsonl, OUT/report.json and OUT/state.pt (resumable: the same command goes on),
and at the end OUT/checkpoint: the trained weights as a RET checkpoint whose card says how it
was trained and decodes (what `retd add-editor BANK OUT/checkpoint` gives a phrase bank).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from retd.model.batches import IGNORE, encode_texts, make_batch, text_bytes
from retd.model.checkpoint import load_checkpoint, save_checkpoint
from retd.model.decoding_eval import Decoder
from retd.model.embed import load_split
from retd.model.evaluate import heldout_rows, nearest, nearest_k, text_scores
from retd.model.generation import generate
from retd.model.loss import sequence_loss
from retd.model.model import RET
from retd.model.pointer import PointerRET

POOL = 32  # batches drawn at once, sorted by length, then run in a random order


def embeddings_digest(*arrays: np.ndarray) -> str:
    """A short fingerprint of embedding matrices (their shapes and first four columns)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a[:, :4]).tobytes())
    return h.hexdigest()[:16]


def text_loss(
    model: RET, embeddings: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The mean loss of the scored targets, a PointerRET's with its copies."""
    if isinstance(model, PointerRET):
        return model.loss(embeddings, inputs, targets)
    return sequence_loss(model, embeddings, inputs, targets)


def prefixed_batch(
    prefixes: Sequence[np.ndarray], texts: Sequence[np.ndarray], eos_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, T) = prefix, EOS, text, 0-padded; targets (B, T+1) = the text then EOS at
    the rows that predict them, everything else IGNOREd (RET's row t predicts token t):
    `make_batch` of the whole sequences, the prefix and separator then unscored."""
    seqs = [np.concatenate([p, [eos_id], t]) for p, t in zip(prefixes, texts, strict=True)]
    inputs, targets = make_batch(seqs, np.arange(len(seqs)), eos_id)
    starts = torch.tensor([len(p) + 1 for p in prefixes])  # (B,): the text's first row
    targets[torch.arange(targets.shape[1]) < starts[:, None]] = IGNORE
    return inputs, targets


def lr_at(step: int, minutes: float, peak: float, total_minutes: float, warmup: int = 200) -> float:
    """Linear warm-up over `warmup` steps, then cosine over the run's minutes to 10% of peak."""
    frac = min(minutes / total_minutes, 1.0)
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


class Experiment:
    """The data, the model and the held-out set of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        loaded = load_checkpoint(args.init)
        self.init = loaded
        self.model: RET = PointerRET.of(loaded.model) if args.pointer else loaded.model
        self.tokenizer = loaded.tokenizer
        self.eos = self.model.config.eos_id
        train = load_split(args.data_dir, "train")
        held = load_split(args.data_dir, "heldout")
        self.train_texts = train.texts
        self.train_emb = torch.from_numpy(train.embeddings.astype(np.float32))
        self.neighbours = self._neighbours(train.embeddings, held.embeddings)
        limit = self.model.config.max_length
        self.encoded = encode_texts(train.texts, limit, self.tokenizer)
        self.lengths = np.array([len(e) for e in self.encoded])
        rows = heldout_rows(len(held.texts), args.heldout)
        self.held_refs = [held.texts[i] for i in rows]
        self.held_encoded = encode_texts(self.held_refs, limit, self.tokenizer)
        self.held_emb = torch.from_numpy(held.embeddings[rows].astype(np.float32))
        self.held_nb = self.neighbours["heldout_idx"][rows]
        self.held_sim = self.neighbours["heldout_sim"][rows]

    def _neighbours(self, train: np.ndarray, held: np.ndarray) -> dict[str, np.ndarray]:
        """The nearest training text of every training and held-out text, searched once and
        cached in OUT/neighbours.npz with a digest of the embeddings searched: a data directory
        whose splits have changed since (e.g. more shards embedded) is refused, not misread."""
        path = self.args.out / "neighbours.npz"
        digest = np.array(embeddings_digest(train, held))
        queries = self.query_rows(len(train))
        if not path.exists():
            kw: dict[str, Any] = {"dtype": torch.bfloat16, "chunk": 512}
            train_idx, train_sim = nearest_k(
                train[queries], train, self.args.neighbours, own=queries, **kw
            )
            held_idx, held_sim = nearest(held, train, **kw)
            np.savez(
                path,
                train_rows=queries,
                train_idx=train_idx,
                train_sim=train_sim,
                heldout_idx=held_idx,
                heldout_sim=held_sim,
                digest=digest,
            )
        with np.load(path) as z:
            found = {k: z[k] for k in z.files}
        if found["train_idx"].ndim == 1:  # written before --neighbours: every text, its nearest
            found["train_idx"] = found["train_idx"][:, None]
            found.setdefault("train_rows", np.arange(len(found["train_idx"])))
        shape = (len(found["heldout_idx"]), *found["train_idx"].shape)
        if (
            shape != (len(held), len(queries), self.args.neighbours)
            or not np.array_equal(found["train_rows"], queries)
            or found.get("digest", digest) != digest
        ):
            raise ValueError(
                f"{path} holds {shape[2]} neighbours of {shape[1]} training and {shape[0]} "
                f"held-out texts, not {self.args.neighbours} of the {len(queries)} training "
                f"(--queries) and {len(held)} held-out texts embedded in {self.args.data_dir} "
                "now: remove it to search again, or use another OUT"
            )
        return found

    def query_rows(self, n: int) -> np.ndarray:
        """The training texts trained on (all, or `--queries` of them drawn with the seed);
        every training text is a neighbour all the same."""
        if not 0 < self.args.queries < n:
            return np.arange(n)
        drawn = np.random.default_rng(self.args.seed).permutation(n)[: self.args.queries]
        return np.sort(drawn)

    def prefix(self, neighbour: int) -> np.ndarray:
        if self.args.neighbour_drop >= 1:
            return self.encoded[neighbour][:0]
        return self.encoded[neighbour][: self.args.max_prefix]

    @torch.no_grad()
    def heldout_loss(self) -> float:
        """Loss per byte of the held-out texts (their EOS counted as one byte)."""
        total = 0.0
        for s in range(0, len(self.held_refs), 100):
            nbs = self.held_nb[s : s + 100]
            inputs, targets = prefixed_batch(
                [self.prefix(j) for j in nbs], self.held_encoded[s : s + 100], self.eos
            )
            loss = text_loss(self.model, self.held_emb[s : s + 100], inputs, targets)
            total += float(loss) * int((targets != IGNORE).sum())
        return total / text_bytes(self.held_encoded, self.tokenizer)

    @torch.no_grad()
    def decode(self) -> list[str]:
        """The held-out texts decoded after their neighbours, `--decoder`'s way."""
        params = Decoder.parse(self.args.decoder).params(self.model.config.max_length)
        texts: list[str] = []
        for s in range(0, len(self.held_refs), 100):
            prefixes = [[*self.prefix(j).tolist(), self.eos] for j in self.held_nb[s : s + 100]]
            results = generate(
                self.model, self.held_emb[s : s + 100], [params] * len(prefixes),
                tokenizer=self.tokenizer, prefixes=prefixes,
            )  # fmt: skip
            texts += [r.text for r in results]
        return texts


def evaluate(exp: Experiment, step: int, minutes: float, final: bool) -> dict[str, Any]:
    """Scores the model in eval mode, and leaves it in the mode it came in."""
    training = exp.model.training
    exp.model.eval()
    hypotheses = exp.decode()
    scores = text_scores(hypotheses, exp.held_refs)
    record: dict[str, Any] = {
        "step": step, "minutes": round(minutes, 2), "heldout_loss": round(exp.heldout_loss(), 4),
        "chrf": round(scores["chrf"], 2), "bleu": round(scores["bleu"], 2),
    }  # fmt: skip
    exp.model.train(training)
    if final:
        from retd.model.encoder import SentenceEncoder

        encoded = SentenceEncoder.load().encode(hypotheses)
        cosines = F.cosine_similarity(torch.from_numpy(encoded).float(), exp.held_emb)
        record["cosine"] = round(float(cosines.mean()), 4)
        retrieved = [exp.train_texts[j] for j in exp.held_nb]
        baseline = text_scores(retrieved, exp.held_refs)
        record["retrieval"] = {k: round(v, 2) for k, v in baseline.items()}
        record["retrieval"]["cosine"] = round(float(exp.held_sim.mean()), 4)
        record["by_similarity"] = by_similarity(exp.held_sim, hypotheses, retrieved, exp.held_refs)
        record["examples"] = [
            {"reference": exp.held_refs[i], "neighbour": retrieved[i], "decoded": hypotheses[i]}
            for i in range(0, len(hypotheses), max(1, len(hypotheses) // 10))
        ]
    return record


def by_similarity(
    sims: np.ndarray, decoded: Sequence[str], retrieved: Sequence[str], refs: Sequence[str]
) -> list[dict[str, Any]]:
    """chrF of the decoded texts and of retrieval within bands of the neighbour's similarity."""
    bands = []
    for low, high in ((-1.0, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01)):
        rows = [i for i, s in enumerate(sims) if low <= s < high]
        if rows:
            chrf = lambda texts: text_scores([texts[i] for i in rows], [refs[i] for i in rows])  # noqa: B023, E731
            bands.append({
                "similarity": [low, high], "texts": len(rows),
                "decoded_chrf": round(chrf(decoded)["chrf"], 2),
                "retrieval_chrf": round(chrf(retrieved)["chrf"], 2),
            })  # fmt: skip
    return bands


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    exp = Experiment(args)
    model = exp.model
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    step, done_minutes = 0, 0.0
    state_path = args.out / "state.pt"
    if state_path.exists():
        state = torch.load(state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, done_minutes = state["step"], state["minutes"]
    log = (args.out / "log.jsonl").open("a")
    start = time.time()
    minutes = lambda: done_minutes + (time.time() - start) / 60  # noqa: E731

    def save() -> None:
        state = {"model": model.state_dict(), "opt": opt.state_dict()}
        torch.save({**state, "step": step, "minutes": minutes()}, state_path)

    def record(final: bool = False) -> dict[str, Any]:
        rec = evaluate(exp, step, minutes(), final)
        print(json.dumps({k: v for k, v in rec.items() if k != "examples"}), flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        return rec

    if args.eval_only or step == 0:
        first = record(final=args.eval_only)
        if args.eval_only:
            return first
    generator = torch.Generator().manual_seed(args.seed + step)
    rows_of, nbs_of = exp.neighbours["train_rows"], exp.neighbours["train_idx"]  # (Q,), (Q, K)
    model.train()
    finished = lambda: minutes() >= args.minutes or step >= args.max_steps  # noqa: E731
    while not finished():
        drawn = torch.randint(len(rows_of), (args.batch * POOL,), generator=generator).numpy()
        rank = torch.randint(nbs_of.shape[1], (len(drawn),), generator=generator).numpy()
        pool, pool_nbs = rows_of[drawn], nbs_of[drawn, rank]  # a row and one of its K nearest
        size = exp.lengths[pool] + exp.lengths[pool_nbs].clip(max=args.max_prefix)
        order = np.argsort(size, kind="stable")
        pool, pool_nbs = pool[order], pool_nbs[order]
        for b in torch.randperm(POOL, generator=generator).tolist():
            if finished():
                break
            rows = pool[b * args.batch : (b + 1) * args.batch]
            prefixes = [exp.prefix(j) for j in pool_nbs[b * args.batch : (b + 1) * args.batch]]
            if 0 < args.neighbour_drop < 1:
                keep = torch.rand(len(rows), generator=generator).numpy() >= args.neighbour_drop
                prefixes = [p if k else p[:0] for p, k in zip(prefixes, keep, strict=True)]
            inputs, targets = prefixed_batch(prefixes, [exp.encoded[i] for i in rows], exp.eos)
            loss = text_loss(model, exp.train_emb[rows], inputs, targets)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, minutes(), args.lr, args.minutes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % args.eval_every == 0:
                record()
                save()
    final = record(final=True)
    save()
    (args.out / "report.json").write_text(json.dumps(final, indent=2) + "\n")
    write_checkpoint(exp, step, minutes(), final)
    return final


def write_checkpoint(exp: Experiment, step: int, minutes: float, final: dict[str, Any]) -> Path:
    """OUT/checkpoint: the trained weights, with the init's card (tokenizer, encoder, decode
    defaults) and what this run did."""
    args, init = exp.args, exp.init
    keep = ("encoder", "decode_defaults")
    card = {k: v for k, v in init.card.items() if k in keep}
    card["trained"] = True
    card["version"] = f"{init.version}-{'pointer' if args.pointer else 'prefix'}.{step}"
    card["training"] = {
        "command": "python -m retd.model.neighbour_prefix " + " ".join(args.argv),
        "init_from": str(args.init),
        "decodes": "after a neighbour: retd add-editor BANK THIS"
        + ("" if args.pointer else " --no-pointer"),
        "datastore": f"{len(exp.train_texts):,} embedded training texts ({args.data_dir})",
        "steps": step, "minutes": round(minutes, 2), "learning_rate": args.lr,
        "batch_size": args.batch, "max_prefix": args.max_prefix, "seed": args.seed,
        "neighbours": args.neighbours, "queries": len(exp.neighbours["train_rows"]),
        "threads": args.threads,
        "heldout": {k: v for k, v in final.items() if k != "examples"},
    }  # fmt: skip
    return save_checkpoint(
        exp.model, args.out / "checkpoint", architecture=init.architecture, card=card,
        tokenizer=exp.tokenizer,
    )  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m retd.model.neighbour_prefix", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("out", type=Path)
    ap.add_argument("--init", type=Path, default=Path("model/checkpoints/ret_v21_bpe1792"))
    ap.add_argument("--data-dir", type=Path, default=Path("build/data"))
    ap.add_argument("--minutes", type=float, default=50.0)
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--max-prefix", type=int, default=64)
    ap.add_argument("--neighbour-drop", type=float, default=0.0)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--heldout", type=int, default=500)
    ap.add_argument("--decoder", default="rp=1.5,rpn=2,eos=-3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--pointer", action="store_true", help="copy from the prefix (PointerRET)")
    ap.add_argument(
        "--neighbours", type=int, default=1, help="train after one of each text's K nearest (1)"
    )
    ap.add_argument(
        "--queries", type=int, default=0, help="train on this many of the texts (0: all)"
    )
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the card's "command"
    if args.neighbours < 1 or args.queries < 0:
        ap.error(f"--neighbours must be >= 1 and --queries >= 0: {args.neighbours}, {args.queries}")
    if not 0 <= args.neighbour_drop <= 1:
        ap.error(f"--neighbour-drop must be in [0, 1], got {args.neighbour_drop}")
    return args


if __name__ == "__main__":
    run(parse_args())
