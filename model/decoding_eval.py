"""Which deterministic decoder to serve: a checkpoint's held-out texts decoded every way.

    python -m retd.model.decoding_eval CHECKPOINT TEXTS [--limit 500] [--decoders SPEC ...]
        [--json OUT.json] [--markdown]

TEXTS is a file of texts, one a line (e.g. the held-out split's `heldout.txt`); each is embedded
with the sentence encoder (all-mpnet-base-v2), decoded by every decoder, and scored against
itself: chrF and BLEU (sacrebleu, as `retd eval`), the cosine between the input embedding and
the decoded text re-encoded, the share of outputs that loop (see `loops`), the share that ran
to their length limit without the end-of-sequence byte, and the mean length in bytes. Then a
few everyday sentences (EVERYDAY, or --examples FILE) are decoded by each decoder to show.

A decoder spec is `name` or comma-separated `key=value` pairs:
  nr=N         no_repeat_ngram_size N (never repeat a byte N-gram)
  rp=P         repetition_penalty P (CTRL-style)
  rpn=N        repetition_ngram_size N (the penalty's n-gram; 1 = every byte generated)
  max=N        max_new_tokens N (default: the model's max_length - 1, as `retd eval`)
  eos=B        eos_bias B: added to the end-of-sequence token's logit at every step (length)
  cfg=W        guidance W (as classifier-free guidance): each step's logits plus W times the
               log-probabilities given the embedding less those given a zero embedding (a
               second pass of the model a step; measured here, not served)
  mbr=N        minimum Bayes risk: the decoder's output and N samples drawn beside it (each
               row's seeds fixed, so still deterministic), keeping the one with the highest
               mean chrF against the others (N + 1 decodes a text; measured here, not served)
  t=T          the samples' temperature (mbr only; default 0.6, top-p 0.95)
  by=cos       pick from the mbr pool by the encoder instead: the text whose re-encoding is
               nearest (cosine) the input embedding (the sentence encoder runs N + 1 times a
               text; measured here, not served)
e.g. `greedy`, `nr=6`, `rp=1.3,rpn=4`, `nr=8,rp=1.2,max=160`, `rp=1.5,rpn=2,eos=-3,cfg=0.2`,
`rp=1.5,rpn=2,eos=-3,mbr=16,t=0.6`, `rp=1.5,rpn=2,eos=-3,mbr=16,t=0.4,by=cos`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retd.model.encoder import Encode, cosine_rows
from retd.model.generation import FinishReason, SamplingParams, generate
from retd.model.model import RET, KVCache
from retd.model.tokenizer import BYTES, Tokenizer

# Sentences of everyday kinds (news, questions, instructions, dialogue, ...) to show outputs on.
EVERYDAY = (
    "The stock market fell sharply on Monday.",
    "I would like a cup of coffee, please.",
    "The president will visit Japan next week to discuss trade.",
    "Heavy rain caused flooding in several towns overnight.",
    "Scientists have discovered a new species of frog in the rainforest.",
    "What time does the train leave for London?",
    "Where did you put the car keys?",
    "How do I reset my password?",
    "Can you recommend a good restaurant nearby?",
    "Preheat the oven to 200 degrees and bake for twenty minutes.",
    "Turn left at the second traffic light.",
    "Please close the door when you leave.",
    "Hi, how are you doing today?",
    "Thanks, I really appreciate your help.",
    "Sorry, I can't make it to the meeting tomorrow.",
    "The cat is sleeping on the sofa.",
    "My brother plays the guitar in a band.",
    "It is going to be sunny and warm this weekend.",
    "The children are playing football in the park.",
    "She bought a new dress for the wedding.",
    "The museum is closed on Mondays.",
    "Water boils at one hundred degrees Celsius.",
)

# The decoders measured when --decoders is not given.
DEFAULT_DECODERS = (
    "greedy",
    "nr=3",
    "nr=4",
    "nr=5",
    "nr=6",
    "nr=8",
    "nr=10",
    "rp=1.1",
    "rp=1.2",
    "rp=1.4",
    "rp=1.2,rpn=4",
    "rp=1.5,rpn=4",
    "rp=2,rpn=4",
    "rp=1.5,rpn=6",
    "rp=2,rpn=6",
    "nr=6,rp=1.2",
    "nr=6,rp=1.5,rpn=4",
    "nr=8,rp=1.5,rpn=4",
    "max=128",
    "nr=6,max=128",
    "eos=1",
    "eos=2",
    "nr=6,eos=1",
)

_CONSECUTIVE_REPEAT = re.compile(r"(.{3,}?)\1{2,}", re.DOTALL)


def loops(text: str) -> bool:
    """Whether a text loops: some stretch of 3 or more characters repeats 3 times in a row
    ("ston ston ston"), or some word trigram occurs 3 times ("I'm can, ... I'm can, ...")."""
    if _CONSECUTIVE_REPEAT.search(text):
        return True
    words = text.split()
    trigrams = Counter(zip(words, words[1:], words[2:], strict=False))
    return any(count >= 3 for count in trigrams.values())


@dataclass(frozen=True)
class Decoder:
    """One deterministic decoder: greedy with loop breakers and length handling."""

    spec: str
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    repetition_ngram_size: int = 1
    max_new_tokens: int | None = None
    eos_bias: float = 0.0
    guidance: float = 0.0
    mbr: int = 0  # samples drawn beside the decoder's output (0: none)
    temperature: float = 0.6  # theirs
    by: str = "chrf"  # how the mbr pool is picked from: "chrf" consensus or "cos" re-encoded

    @classmethod
    def parse(cls, spec: str) -> Decoder:
        if spec == "greedy":
            return cls(spec)
        keys = {
            "nr": "no_repeat_ngram_size",
            "rp": "repetition_penalty",
            "rpn": "repetition_ngram_size",
            "max": "max_new_tokens",
            "eos": "eos_bias",
            "cfg": "guidance",
            "mbr": "mbr",
            "t": "temperature",
            "by": "by",
        }
        fields: dict[str, Any] = {}
        for item in spec.split(","):
            key, _, value = item.partition("=")
            if key not in keys or not value:
                raise ValueError(f"decoder {spec!r}: expected key=value with key in {list(keys)}")
            name = keys[key]
            default = getattr(cls, name)
            kind = type(default) if isinstance(default, float | str) else int
            fields[name] = kind(value)
        if fields.get("by", "chrf") not in ("chrf", "cos"):
            raise ValueError(f"decoder {spec!r}: by= must be chrf or cos")
        return cls(spec, **fields)

    def params(self, max_length: int) -> SamplingParams:
        return SamplingParams(
            self.max_new_tokens or max_length - 1,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            repetition_penalty=self.repetition_penalty,
            repetition_ngram_size=self.repetition_ngram_size,
            eos_bias=self.eos_bias,
        )

    def sample_params(self, max_length: int, seed: int) -> SamplingParams:
        """One of the `mbr` samples: these loop breakers, drawn at `temperature`."""
        return replace(self.params(max_length), temperature=self.temperature, top_p=0.95, seed=seed)


def mbr_pick(pool: Sequence[str]) -> str:
    """The text of `pool` with the highest mean sentence chrF against the others (the first
    such on a tie): the consensus of the pool, the minimum Bayes risk choice under chrF."""
    return pool[int(np.argmax(consensus_scores(pool)))]


def consensus_scores(pool: Sequence[str]) -> np.ndarray:
    """Each text's mean sentence chrF against the pool's other texts, (len(pool),) float64
    (zeros for a pool of one)."""
    from sacrebleu.metrics import CHRF
    from sacrebleu.metrics.helpers import extract_all_char_ngrams

    if len(pool) < 2:
        return np.zeros(len(pool))
    chrf = CHRF()
    # sacrebleu's own steps of `chrf.sentence_score(a, [b])` (chrF: character n-grams only),
    # with each text's n-grams extracted once rather than 2 (len(pool) - 1) times.
    grams = [
        extract_all_char_ngrams(chrf._preprocess_segment(t), chrf.char_order, chrf.whitespace)
        for t in pool
    ]

    def score(hyp: int, ref: int) -> float:
        stats: list[int] = []
        for h, r in zip(grams[hyp], grams[ref], strict=True):
            stats.extend(chrf._get_match_statistics(h, r))
        return float(chrf._compute_score_from_stats(stats).score)

    return np.array(
        [np.mean([score(i, j) for j in range(len(pool)) if j != i]) for i in range(len(pool))]
    )


def pool_cosines(
    pools: Sequence[Sequence[str]],
    embeddings: torch.Tensor,
    encode: Encode,
) -> list[np.ndarray]:
    """Each pool's texts re-encoded (every pool in one `encode` call), as their cosines to
    the pool's row of `embeddings`: one (len(pool),) array a pool."""
    flat = [t for pool in pools for t in pool]
    owners = np.repeat(np.arange(len(pools)), [len(p) for p in pools])
    cosines = cosine_rows(np.asarray(encode(flat)), embeddings.float().numpy()[owners])
    return np.split(cosines, np.cumsum([len(p) for p in pools])[:-1])


def cosine_pick(
    pools: Sequence[Sequence[str]],
    embeddings: torch.Tensor,
    encode: Encode,
) -> list[str]:
    """From each row's pool, the text whose re-encoding is nearest (cosine) the row's
    embedding (the first such on a tie)."""
    cosines = pool_cosines(pools, embeddings, encode)
    return [pool[int(np.argmax(c))] for pool, c in zip(pools, cosines, strict=True)]


def guided_step(model: RET, rows: int, weight: float) -> Callable[..., torch.Tensor]:
    """A `generate` step with guidance `weight`: the model's logits plus `weight` times its
    log-probabilities given each row's embedding less those given a zero embedding, which
    runs beside it in a cache of its own (`rows` slots)."""
    config = model.config
    with torch.no_grad():
        unconditioned = model.condition(torch.zeros(1, config.embedding_dim))  # (1, C)
    cache = KVCache(config, num_slots=rows, device="cpu", dtype=unconditioned.dtype)

    def step(cond: torch.Tensor, *args: Any) -> torch.Tensor:
        tokens, positions, own_cache, slots, *known = args
        given = model.step(cond, tokens, positions, own_cache, slots, *known)  # (B, V)
        blind = model.step(unconditioned.expand_as(cond), tokens, positions, cache, slots, *known)
        return given + weight * (given.log_softmax(-1) - blind.log_softmax(-1))

    return step


def decode_all(
    model: RET,
    embeddings: torch.Tensor,
    decoder: Decoder,
    batch_size: int = 256,
    tokenizer: Tokenizer = BYTES,
    encode: Encode | None = None,
) -> tuple[list[str], list[FinishReason], list[int]]:
    """Each row decoded: texts, finish reasons, and bytes generated. `encode` (texts to
    embeddings) is the sentence encoder a `by=cos` decoder picks with."""
    if decoder.mbr:
        return _decode_mbr(model, embeddings, decoder, batch_size, tokenizer, encode)
    params = decoder.params(model.config.max_length)
    texts: list[str] = []
    reasons: list[FinishReason] = []
    lengths: list[int] = []
    for start in range(0, len(embeddings), batch_size):
        chunk = embeddings[start : start + batch_size]
        step = guided_step(model, len(chunk), decoder.guidance) if decoder.guidance else None
        rows = [params] * len(chunk)
        for result in generate(model, chunk, rows, tokenizer=tokenizer, step=step):
            texts.append(result.text)
            reasons.append(result.finish_reason)
            lengths.append(len(result.text.encode("utf-8")))
    return texts, reasons, lengths


def _decode_mbr(
    model: RET,
    embeddings: torch.Tensor,
    decoder: Decoder,
    batch_size: int,
    tokenizer: Tokenizer,
    encode: Encode | None,
) -> tuple[list[str], list[FinishReason], list[int]]:
    """`decode_all` for an `mbr` decoder: row i's pool is its deterministic output and
    `decoder.mbr` samples seeded by (i, k); the pick's finish reason and length."""
    plain = replace(decoder, mbr=0)
    texts, reasons, _ = decode_all(model, embeddings, plain, batch_size, tokenizer)
    pools = [[(t, r)] for t, r in zip(texts, reasons, strict=True)]
    max_length = model.config.max_length
    for start in range(0, len(embeddings), batch_size):
        chunk = embeddings[start : start + batch_size]
        for k in range(decoder.mbr):
            rows = [
                plain.sample_params(max_length, (start + i) * 1009 + k) for i in range(len(chunk))
            ]
            for i, result in enumerate(generate(model, chunk, rows, tokenizer=tokenizer)):
                pools[start + i].append((result.text, result.finish_reason))
    if decoder.by == "cos":
        if encode is None:
            raise ValueError(f"decoder {decoder.spec!r} picks by the encoder: pass encode=")
        chosen = cosine_pick([[t for t, _ in pool] for pool in pools], embeddings, encode)
    else:
        chosen = [mbr_pick([t for t, _ in pool]) for pool in pools]
    reasons = [dict(pool)[t] for pool, t in zip(pools, chosen, strict=True)]
    return chosen, reasons, [len(t.encode("utf-8")) for t in chosen]


def measure(
    checkpoint: Path,
    texts: Sequence[str],
    decoders: Sequence[str] = DEFAULT_DECODERS,
    examples: Sequence[str] = EVERYDAY,
    log: Any = None,
    partial: Path | None = None,
) -> dict[str, Any]:
    """The figures of the module docstring for every decoder, and the examples' outputs."""
    from retd.model.checkpoint import load_checkpoint
    from retd.model.encoder import SentenceEncoder
    from retd.model.evaluate import text_scores

    loaded = load_checkpoint(checkpoint, device="cpu")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    encoder = SentenceEncoder.load()
    started = time.perf_counter()
    embeddings = encoder.encode(list(texts)).astype(np.float32)
    example_embeddings = encoder.encode(list(examples)).astype(np.float32)
    if log:
        log(
            f"embedded {len(texts)} + {len(examples)} texts in {time.perf_counter() - started:.1f}s"
        )
    reference_bytes = float(np.mean([len(t.encode("utf-8")) for t in texts]))
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "texts": len(texts),
        "reference_mean_bytes": round(reference_bytes, 1),
        "decoders": {},
        "examples": [{"input": e} for e in examples],
    }
    for spec in decoders:
        decoder = Decoder.parse(spec)
        started = time.perf_counter()
        decoded, reasons, lengths = decode_all(
            model, torch.from_numpy(embeddings), decoder, tokenizer=tokenizer,
            encode=encoder.encode,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        figures: dict[str, Any] = {
            k: round(v, 2) for k, v in text_scores(decoded, texts).items() if k != "exact_match"
        }
        cosine = cosine_rows(encoder.encode(decoded), embeddings)
        figures["cosine"] = round(float(cosine.mean()), 4)
        figures["loops_pct"] = round(100.0 * float(np.mean([loops(t) for t in decoded])), 1)
        figures["no_eos_pct"] = round(
            100.0 * float(np.mean([r != FinishReason.EOS for r in reasons])), 1
        )
        figures["mean_bytes"] = round(float(np.mean(lengths)), 1)
        figures["decode_s"] = round(seconds, 1)
        report["decoders"][spec] = figures
        shown, _, _ = decode_all(
            model, torch.from_numpy(example_embeddings), decoder, tokenizer=tokenizer,
            encode=encoder.encode,
        )  # fmt: skip
        for row, text in zip(report["examples"], shown, strict=True):
            row[spec] = text
        if log:
            log(f"{spec}: {figures}")
        if partial is not None:  # what is measured so far survives an interruption
            partial.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        "| decoder | chrF | BLEU | cosine | loops % | no EOS % | mean bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec, f in report["decoders"].items():
        lines.append(
            f"| `{spec}` | {f['chrf']:.2f} | {f['bleu']:.2f} | {f['cosine']:.4f} | "
            f"{f['loops_pct']:.1f} | {f['no_eos_pct']:.1f} | {f['mean_bytes']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m retd.model.decoding_eval",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("checkpoint", type=Path, help="a RET checkpoint directory")
    parser.add_argument("texts", type=Path, help="texts to decode, one a line")
    parser.add_argument("--limit", type=int, default=500, help="the first N texts (500)")
    parser.add_argument("--decoders", nargs="+", default=list(DEFAULT_DECODERS), metavar="SPEC")
    parser.add_argument("--examples", type=Path, help="everyday sentences, one a line")
    parser.add_argument("--json", type=Path, help="write the report here (after each decoder)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = [t for t in args.texts.read_text(encoding="utf-8").splitlines() if t.strip()]
    examples = EVERYDAY
    if args.examples is not None:
        examples = tuple(
            t for t in args.examples.read_text(encoding="utf-8").splitlines() if t.strip()
        )
    report = measure(
        args.checkpoint,
        texts[: args.limit],
        args.decoders,
        examples,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        partial=args.json,
    )
    print(markdown_table(report) if args.markdown else json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
