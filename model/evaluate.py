"""`retd eval`: how well a checkpoint turns held-out embeddings back into their texts.

Figures on the held-out split (texts training never saw), each decoded greedily, the way
Decode decodes by default (greedy with its default loop breakers, `defaults.DecodeDefaults`)
and with beam search: chrF and BLEU (sacrebleu), exact match, and the cosine between the input
embedding and the decoded text re-encoded by the same encoder. Beside them: teacher-forced
byte accuracy and loss, and the retrieval baseline (the nearest training text by cosine),
which shows what generation adds over looking the answer up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from retd.model.batches import IGNORE, batches_in_order, encode_texts, text_bytes
from retd.model.defaults import DecodeDefaults
from retd.model.encoder import Encode
from retd.model.generation import SamplingParams, generate
from retd.model.model import RET, KVCache
from retd.model.tokenizer import BYTES, Tokenizer


@torch.no_grad()
def greedy_texts(
    model: RET,
    embeddings: torch.Tensor,
    max_new_tokens: int = 200,
    batch_size: int = 256,
    no_repeat_ngram_size: int = 0,
    breakers: DecodeDefaults | None = None,
    tokenizer: Tokenizer = BYTES,
) -> list[str]:
    """Greedy decoding of each embedding row, optionally never repeating a byte n-gram (its
    `no_repeat_ngram_size`) or with `breakers`, Decode's default loop breakers."""
    params = (
        SamplingParams(max_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size)
        if breakers is None
        else SamplingParams(
            max_new_tokens,
            no_repeat_ngram_size=breakers.no_repeat_ngram_size,
            repetition_penalty=breakers.repetition_penalty,
            repetition_ngram_size=breakers.repetition_ngram_size,
            eos_bias=breakers.eos_bias,
        )
    )
    return _texts_in_chunks(
        embeddings,
        batch_size,
        lambda chunk: [
            r.text for r in generate(model, chunk, [params] * len(chunk), tokenizer=tokenizer)
        ],
    )


def _texts_in_chunks(
    embeddings: torch.Tensor, batch_size: int, decode: Callable[[torch.Tensor], list[str]]
) -> list[str]:
    """decode() applied to successive chunks of at most batch_size rows, outputs in order."""
    texts: list[str] = []
    for start in range(0, len(embeddings), batch_size):
        texts += decode(embeddings[start : start + batch_size])
    return texts


@torch.no_grad()
def beam_search(
    model: RET,
    embeddings: torch.Tensor,
    num_beams: int,
    max_new_tokens: int = 200,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Beam search with the KV cache; returns the best byte sequence (without EOS) per row.

    Each step expands every live beam, keeps the num_beams best continuations, and moves
    finished hypotheses (EOS) aside, scored by sum(logprob) / length ** length_penalty. A row
    stops once num_beams hypotheses have finished (or at max_new_tokens).
    """
    config = model.config
    B, K, V = len(embeddings), num_beams, config.vocab_size
    N = B * K
    device = model.wte.weight.device
    cond = model.condition(embeddings.to(device)).repeat_interleave(K, 0)  # (N, C)
    cache = KVCache(config, N, device=device, dtype=model.wte.weight.dtype)
    slots = torch.arange(N, device=device)
    scores = torch.full((B, K), -torch.inf, device=device)
    scores[:, 0] = 0.0  # one live beam per row at first: the others would duplicate it
    sequences = torch.zeros(N, 0, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    previous = torch.zeros(N, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        positions = torch.full((N,), t, dtype=torch.long, device=device)
        logits = model.step(cond, previous, positions, cache, slots, length=t + 1)
        logprobs = F.log_softmax(logits.float(), dim=-1).view(B, K, V)
        candidates = (scores[:, :, None] + logprobs).view(B, K * V)
        top_scores, top_index = candidates.topk(2 * K, dim=1)  # (B, 2K)
        new_scores = torch.full((B, K), -torch.inf, device=device)
        parents = torch.arange(N, device=device).view(B, K).clone()
        new_tokens = torch.zeros(B, K, dtype=torch.long, device=device)
        top_scores_list, top_index_list = top_scores.tolist(), top_index.tolist()
        for b in range(B):
            if done[b]:
                continue
            kept = 0
            for score, index in zip(top_scores_list[b], top_index_list[b], strict=True):
                if score == -float("inf"):
                    break
                beam, token = divmod(index, V)
                if token == config.eos_id:
                    seq = sequences[b * K + beam].tolist()
                    finished[b].append((score / max(1, len(seq) + 1) ** length_penalty, seq))
                else:
                    new_scores[b, kept] = score
                    parents[b, kept] = b * K + beam
                    new_tokens[b, kept] = token
                    kept += 1
                if kept == K:
                    break
            if len(finished[b]) >= K:
                done[b] = True
                new_scores[b] = -torch.inf
        if all(done):
            break
        parents_flat = parents.view(N)
        cache.k[:, :, :, : t + 1] = cache.k[:, parents_flat, :, : t + 1]
        cache.v[:, :, :, : t + 1] = cache.v[:, parents_flat, :, : t + 1]
        sequences = torch.cat((sequences[parents_flat], new_tokens.view(N, 1)), dim=1)
        scores = new_scores
        previous = new_tokens.view(N)
    best: list[list[int]] = []
    for b in range(B):
        pool = list(finished[b])
        if not done[b]:  # ran out of length: live beams compete too
            for k in range(K):
                if scores[b, k] > -torch.inf:
                    seq = sequences[b * K + k].tolist()
                    pool.append((float(scores[b, k]) / max(1, len(seq)) ** length_penalty, seq))
        best.append(max(pool, key=lambda item: item[0])[1] if pool else [])
    return best


def beam_texts(
    model: RET,
    embeddings: torch.Tensor,
    num_beams: int,
    max_new_tokens: int = 200,
    batch_size: int = 128,
    tokenizer: Tokenizer = BYTES,
) -> list[str]:
    return _texts_in_chunks(
        embeddings,
        batch_size,
        lambda chunk: [
            tokenizer.decode(seq) for seq in beam_search(model, chunk, num_beams, max_new_tokens)
        ],
    )


def text_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus chrF and BLEU (sacrebleu) and exact match (%), hypotheses against references."""
    import sacrebleu

    return {
        "chrf": sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score,
        "bleu": sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score,
        "exact_match": 100.0
        * float(np.mean([h == r for h, r in zip(hypotheses, references, strict=True)])),
    }


def reference_scores(
    hypotheses: list[str],
    references: Sequence[str],
    embeddings: np.ndarray,
    encode: Encode | None = None,
) -> dict[str, Any]:
    """`text_scores` rounded to 2 decimals and, with `encode` (a sentence encoder), the
    hypotheses' re-encoded cosine to `embeddings` (N, E), rounded to 4."""
    figures: dict[str, Any] = {
        k: round(v, 2) for k, v in text_scores(hypotheses, references).items()
    }
    if encode is not None:
        from retd.model.encoder import cosine_rows

        cosine = cosine_rows(encode(hypotheses), embeddings.astype(np.float32))
        figures["cosine"] = round(float(cosine.mean()), 4)
    return figures


@torch.no_grad()
def token_accuracy(
    model: RET, embeddings: torch.Tensor, texts: Sequence[str], tokenizer: Tokenizer = BYTES
) -> tuple[float, float]:
    """Teacher-forced next-token accuracy (%; a byte model's tokens are bytes) and loss
    (nats per byte: the EOS token counts as one byte), EOS included."""
    encoded = encode_texts(list(texts), model.config.max_length, tokenizer)
    correct = total = 0
    loss_sum = 0.0
    for rows, inputs, targets in batches_in_order(encoded, model.config.eos_id):
        logits = model(embeddings[rows], inputs)
        mask = targets != IGNORE
        correct += int((logits.argmax(-1)[mask] == targets[mask]).sum())
        total += int(mask.sum())
        loss_sum += float(F.cross_entropy(logits[mask], targets[mask], reduction="sum"))
    return 100.0 * correct / total, loss_sum / text_bytes(encoded, tokenizer)


def nearest(
    query: np.ndarray,
    bank: np.ndarray,
    *,
    exclude_self: bool = False,
    dtype: torch.dtype = torch.float32,
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row (N, E), the bank row (M, E) nearest by cosine and that similarity:
    (N,) int64 and (N,) float32. `exclude_self`: the query is the bank itself (N == M) and a
    row may not be its own neighbour. `dtype` is the products' (bfloat16 halves the time on a
    CPU with AVX512-BF16, at ~3 decimals of similarity)."""
    indices, sims = nearest_k(query, bank, 1, exclude_self=exclude_self, dtype=dtype, chunk=chunk)
    return indices[:, 0], sims[:, 0]


def nearest_k(
    query: np.ndarray,
    bank: np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
    dtype: torch.dtype = torch.float32,
    chunk: int = 1024,
    own: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`nearest`'s search, keeping each query row's `k` nearest bank rows, nearest first:
    (N, k) int64 indices and (N, k) float32 similarities. `own`: each query's own row in the
    bank, never its neighbour (`exclude_self` is own = every row)."""
    if exclude_self and len(query) != len(bank):
        raise ValueError(f"exclude_self needs the bank as the query: {len(query)} != {len(bank)}")
    if exclude_self:
        own = np.arange(len(query))
    bank_t = F.normalize(torch.from_numpy(bank.astype(np.float32)), dim=1).to(dtype)
    indices: list[np.ndarray] = []
    sims: list[np.ndarray] = []
    for start in range(0, len(query), chunk):
        q = F.normalize(torch.from_numpy(query[start : start + chunk].astype(np.float32)), dim=1)
        scores = (q.to(dtype) @ bank_t.T).float()  # (chunk, M)
        if own is not None:
            never = torch.from_numpy(own[start : start + chunk])  # each row's own bank row
            scores[torch.arange(len(q)), never] = -float("inf")
        best = scores.topk(min(k, scores.shape[1]), dim=1)
        indices.append(best.indices.numpy())
        sims.append(best.values.numpy())
    return np.concatenate(indices), np.concatenate(sims)


def retrieval_baseline(
    query: np.ndarray, bank: np.ndarray, bank_texts: Sequence[str], chunk: int = 1024
) -> tuple[list[str], np.ndarray]:
    """The nearest bank text (cosine) for each query row, and its similarity."""
    indices, sims = nearest(query, bank, chunk=chunk)
    return [bank_texts[i] for i in indices.tolist()], sims


HEAD_TEXTS = 100  # the scored texts `evaluate_checkpoint(head=...)` writes out


def heldout_rows(n: int, limit: int) -> np.ndarray:
    """`limit` rows evenly spaced over a split of n texts (it is grouped by source: every
    source counts in proportion to its size)."""
    return np.unique(np.linspace(0, n - 1, min(limit, n)).round().astype(int))


def evaluate_checkpoint(
    checkpoint: Path,
    data_dir: Path,
    limit: int = 500,
    num_beams: Sequence[int] = (4,),
    no_repeat_ngram: Sequence[int] = (),
    use_encoder: bool = True,
    write_card: bool = True,
    per_source: int = 0,
    head: Path | None = None,
) -> dict[str, Any]:
    """Every figure of the module docstring on `limit` held-out texts evenly spaced; with
    `per_source`, also greedy and retrieval figures on the first `per_source` texts of each
    source of the held-out and ood splits (`report["per_source"][split][source]`). With
    `head`, the first HEAD_TEXTS scored texts and their embeddings are written there (as
    tests/data/heldout_head, against which the shipped card's examples are checked)."""
    from retd.model.checkpoint import load_checkpoint
    from retd.model.embed import load_split, write_split

    loaded = load_checkpoint(checkpoint, device="cpu")
    model = loaded.model.eval()
    heldout = load_split(data_dir, "heldout")
    rows = heldout_rows(len(heldout.texts), limit)
    texts = [heldout.texts[i] for i in rows]
    embeddings = torch.from_numpy(heldout.embeddings[rows].astype(np.float32))
    if head is not None:
        write_split(head, "heldout", texts[:HEAD_TEXTS], heldout.embeddings[rows][:HEAD_TEXTS])
    max_new = model.config.max_length - 1
    encoder = None
    if use_encoder:
        from retd.model.encoder import SentenceEncoder

        encoder = SentenceEncoder.load()

    encode = None if encoder is None else encoder.encode

    def scored_for(
        decoded: list[str], refs: list[str], rows: np.ndarray, seconds: float
    ) -> dict[str, Any]:
        figures = reference_scores(decoded, refs, rows, encode)
        figures["seconds"] = round(seconds, 1)
        return figures

    def scored(decoded: list[str], seconds: float) -> dict[str, Any]:
        return scored_for(decoded, texts, embeddings.numpy(), seconds)

    report: dict[str, Any] = {"heldout_texts": len(texts)}
    tokenizer = loaded.tokenizer
    report["tokenizer"] = tokenizer.card()
    accuracy, loss = token_accuracy(model, embeddings, texts, tokenizer)
    report["token_accuracy"] = round(accuracy, 2)
    if tokenizer.kind == "bytes":
        report["byte_accuracy"] = report["token_accuracy"]
    report["heldout_loss"] = round(loss, 4)
    started = time.perf_counter()
    greedy = greedy_texts(model, embeddings, max_new, tokenizer=tokenizer)
    report["greedy"] = scored(greedy, time.perf_counter() - started)
    started = time.perf_counter()
    # Decode's defaults for this checkpoint: its card's recommendation, where it makes one.
    breakers = DecodeDefaults().for_card(loaded.card)
    report["decode_defaults"] = asdict(breakers)
    decoded = greedy_texts(model, embeddings, max_new, breakers=breakers, tokenizer=tokenizer)
    report["decode_default"] = scored(decoded, time.perf_counter() - started)
    for ngram in no_repeat_ngram:
        started = time.perf_counter()
        decoded = greedy_texts(
            model, embeddings, max_new, no_repeat_ngram_size=ngram, tokenizer=tokenizer
        )
        report[f"greedy_no_repeat{ngram}"] = scored(decoded, time.perf_counter() - started)
    for beams in num_beams:
        started = time.perf_counter()
        decoded = beam_texts(model, embeddings, beams, max_new, tokenizer=tokenizer)
        report[f"beam{beams}"] = scored(decoded, time.perf_counter() - started)
    train = load_split(data_dir, "train")
    if train.texts:
        started = time.perf_counter()
        retrieved, sims = retrieval_baseline(
            heldout.embeddings[rows], train.embeddings, train.texts
        )
        report["retrieval"] = {
            **scored(retrieved, time.perf_counter() - started),
            "bank_texts": len(train.texts),
        }
    if per_source > 0:
        report["per_source"] = {
            split: _per_source(
                model, tokenizer, data_dir, split, per_source, train, scored_for, max_new, breakers
            )
            for split in ("heldout", "ood")
            if (data_dir / "corpus" / f"{split}.txt").exists()
        }
    report["examples"] = [
        {"reference": r, "greedy": g} for r, g in list(zip(texts, greedy, strict=True))[:8]
    ]
    if write_card:
        write_metrics(checkpoint, report)
    return report


Scorer = Callable[[list[str], list[str], np.ndarray, float], dict[str, Any]]


def _per_source(
    model: RET,
    tokenizer: Tokenizer,
    data_dir: Path,
    split: str,
    cap: int,
    train: Any,
    scored: Scorer,
    max_new: int,
    breakers: DecodeDefaults,
) -> dict[str, dict[str, Any]]:
    """Greedy and Decode-default figures beside the retrieval baseline's on the first `cap`
    embedded texts of each source of a labelled split (sources in file order; "" when the
    corpus is unlabelled)."""
    from retd.model.embed import load_split

    loaded = load_split(data_dir, split)
    figures: dict[str, dict[str, Any]] = {}
    for source, rows in source_rows(data_dir, split, loaded.texts, cap).items():
        refs = [loaded.texts[r] for r in rows]
        vectors = loaded.embeddings[rows]
        inputs = torch.from_numpy(vectors.astype(np.float32))
        entry: dict[str, Any] = {"texts": len(rows)}
        for name, chosen in (("greedy", None), ("decode_default", breakers)):
            started = time.perf_counter()
            decoded = greedy_texts(model, inputs, max_new, breakers=chosen, tokenizer=tokenizer)
            entry[name] = scored(decoded, refs, vectors, time.perf_counter() - started)
        if train.texts:
            started = time.perf_counter()
            retrieved, _ = retrieval_baseline(vectors, train.embeddings, train.texts)
            entry["retrieval"] = scored(retrieved, refs, vectors, time.perf_counter() - started)
        figures[source or "all"] = entry
    return figures


def measured_texts(
    data_dir: Path, limit: int, per_source: int
) -> dict[str, tuple[list[str], np.ndarray]]:
    """The texts and embeddings a measurement scores, by group: "heldout", `limit` held-out
    texts evenly spaced (none when 0), then "SPLIT/SOURCE", the first `per_source` of every
    source of the held-out and ood splits (none when 0)."""
    from retd.model.embed import load_split

    groups: dict[str, tuple[list[str], np.ndarray]] = {}
    held = load_split(data_dir, "heldout") if limit or per_source else None
    if limit and held is not None:
        rows = heldout_rows(len(held.texts), limit)
        groups["heldout"] = ([held.texts[i] for i in rows], held.embeddings[rows])
    for split in ("heldout", "ood") if per_source else ():
        if not (data_dir / "corpus" / f"{split}.txt").exists():
            continue
        part = held if split == "heldout" and held is not None else load_split(data_dir, split)
        for source, chosen in source_rows(data_dir, split, part.texts, per_source).items():
            groups[f"{split}/{source}"] = ([part.texts[i] for i in chosen], part.embeddings[chosen])
    return groups


def source_rows(data_dir: Path, split: str, texts: Sequence[str], cap: int) -> dict[str, list[int]]:
    """The rows of the first `cap` of `texts` (a split's embedded texts) from each source of
    the split, sources in file order ("" when the corpus is unlabelled)."""
    from retd.model.corpus import read_sources

    labels = read_sources(data_dir / "corpus", split)
    by_line = {text: i for i, text in enumerate(_split_texts(data_dir, split))}
    rows_of: dict[str, list[int]] = {}
    for row, text in enumerate(texts):
        source = labels[by_line[text]] if text in by_line else ""
        if len(rows_of.setdefault(source, [])) < cap:
            rows_of[source].append(row)
    return rows_of


def _split_texts(data_dir: Path, split: str) -> list[str]:
    from retd.model.corpus import read_texts

    return read_texts(data_dir / "corpus" / f"{split}.txt")


def write_metrics(checkpoint: Path, report: dict[str, Any]) -> None:
    """Put the evaluation figures into the checkpoint card's `metrics` (weights unchanged)."""
    card_path = checkpoint / "card.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["metrics"] = {**card.get("metrics", {}), "eval": report}
    partial = card_path.with_suffix(".partial")
    partial.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    partial.replace(card_path)
