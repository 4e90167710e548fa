"""The shape search of RET v2.1: candidate shapes at exactly 722,944 parameters, and its table.

    python -m retd.model.shapes [--runs DIR] [--at-step N | --at-minutes M] [--threads 1]
    python -m retd.model.shapes --attention default auto    # training kB/s per attention kernel
    python -m retd.model.shapes --dropout 0 0.1 --shapes 3x128-bpe1792   # ... per dropout

Prints one markdown row per candidate: its shape, parameters, decode milliseconds per step at
batch 1 and 64 (random weights, KV cache, greedy) and training kB/s (batches of 128 texts of
30-120 bytes, bfloat16 autocast, AdamW), each the median of `repeats` runs with the shapes
interleaved so that a noisy machine slows them alike; and, where DIR/NAME holds a `retd train`
run of that candidate (metrics.jsonl), its last held-out evaluation (or the last at or before
step N / M training minutes): loss with the true and with shuffled embeddings, greedy chrF.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch

from retd.model.model import RET, KVCache, RETConfig, config_for

# name -> RETConfig overrides of `ret_v21`; every one has exactly 722,944 parameters (a test
# checks). MLP widths are what is left of the budget after attention, bridge and embeddings.
SHAPES: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "1x256-add": dict(n_layer=1, n_embd=256, mlp_hidden=384, n_head=2, conditioning="add"),
        "2x128-add": dict(n_layer=2, n_embd=128, mlp_hidden=897, n_head=4, conditioning="add"),
        "3x128-add": dict(n_layer=3, n_embd=128, mlp_hidden=512, n_head=4, conditioning="add"),
        "5x128-add": dict(n_layer=5, n_embd=128, mlp_hidden=204, n_head=4, conditioning="add"),
        "2x128-layer": dict(n_layer=2, n_embd=128, mlp_hidden=833, n_head=4, conditioning="layer"),
        "3x128-layer": dict(n_layer=3, n_embd=128, mlp_hidden=448, n_head=4, conditioning="layer"),
        # A byte-level BPE of 1,024 tokens (`retd tokenizer`): the same text in ~2.4x fewer
        # steps; the bigger embedding table is paid for by the MLP.
        "3x128-bpe1024": dict(
            n_layer=3, n_embd=128, mlp_hidden=384, n_head=4, conditioning="add", vocab_size=1024
        ),
        "3x128-bpe1792": dict(
            n_layer=3, n_embd=128, mlp_hidden=256, n_head=4, conditioning="add", vocab_size=1792
        ),
    }
)
# Bytes of corpus text per token, by vocab_size: 1 for bytes; the BPE figures measured on the
# held-out split's 19,472 texts with the tokenizers `retd tokenizer` learns on the corpus.
BYTES_PER_TOKEN: Mapping[int, float] = MappingProxyType({256: 1.0, 1024: 2.51, 1792: 2.88})


@torch.no_grad()
def decode_step_ms(
    configs: Mapping[str, RETConfig], batch: int, steps: int = 64, repeats: int = 5
) -> dict[str, float]:
    """Median milliseconds of one greedy decode step (model.step + argmax) at `batch` rows."""
    models = {name: RET(config).eval() for name, config in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in configs}
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(batch, next(iter(configs.values())).embedding_dim, generator=generator)
    rows = torch.arange(batch)
    for _ in range(repeats):
        for name, model in models.items():
            cache = KVCache(model.config, num_slots=batch)
            cond = model.condition(embeddings)  # (B, C)
            tokens = torch.zeros(batch, dtype=torch.long)
            start = time.perf_counter()
            for t in range(steps):
                logits = model.step(cond, tokens, torch.full_like(rows, t), cache, slots=rows)
                tokens = logits.argmax(-1)  # (B,)
            times[name].append((time.perf_counter() - start) * 1000 / steps)
    return {name: statistics.median(ms) for name, ms in times.items()}


def bytes_per_token(config: RETConfig) -> float:
    return BYTES_PER_TOKEN.get(config.vocab_size, 1.0)


def train_kbytes_per_s(
    configs: Mapping[str, RETConfig],
    batches: int = 4,
    repeats: int = 5,
    attention: Mapping[str, str] | None = None,
    dropout: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Median training kB/s of text (forward, backward, AdamW step) on the same synthetic
    batches of 128 texts of 30-120 bytes (as tokens: bytes / `bytes_per_token`), each
    config's attention on the kernel `retd train` would pick (TrainConfig.attention: "auto"
    unless `attention` names another for it), at the `dropout` named for it (TrainConfig.
    dropout; 0 unless named)."""
    from retd.model.loss import sequence_loss
    from retd.model.train import attention_kernel

    generator = torch.Generator().manual_seed(0)
    lengths = torch.linspace(30, 120, batches).round().long().tolist()
    embeddings = torch.nn.functional.normalize(torch.randn(128, 768, generator=generator), dim=1)
    models = {name: RET(config) for name, config in configs.items()}  # train mode
    for name, p in (dropout or {}).items():
        models[name].set_dropout(p)
    data: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
    for name, config in configs.items():
        per_token = bytes_per_token(config)
        data[name] = []
        for nbytes in lengths:
            T = max(1, round(nbytes / per_token))
            inputs = torch.randint(1, config.vocab_size, (128, T), generator=generator)  # (B, T)
            targets = torch.cat((inputs, torch.zeros(128, 1, dtype=torch.long)), 1)  # (B, T+1)
            data[name].append((inputs, targets, 128 * (nbytes + 1)))
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, model in models.items():
            start, nbytes = time.perf_counter(), 0
            kernel = (attention or {}).get(name, "auto")
            for inputs, targets, text_bytes in data[name]:
                with (
                    attention_kernel(kernel, torch.device("cpu")),
                    torch.autocast("cpu", dtype=torch.bfloat16),
                ):
                    loss = sequence_loss(model, embeddings, inputs, targets)
                optimizers[name].zero_grad()
                loss.backward()
                optimizers[name].step()
                nbytes += text_bytes
            if repeat:
                rates[name].append(nbytes / (time.perf_counter() - start) / 1000)
    return {name: statistics.median(r) for name, r in rates.items()}


def evaluation(
    run_dir: Path, at_step: int | None = None, at_minutes: float | None = None
) -> dict[str, Any] | None:
    """The last metrics.jsonl line of a training run that carries a held-out evaluation (at or
    before a step or a number of training minutes, when given)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evaluated = [
        row
        for row in rows
        if "heldout_loss" in row
        and (at_step is None or row["step"] <= at_step)
        and (at_minutes is None or row["minutes"] <= at_minutes)
    ]
    return evaluated[-1] if evaluated else None


def configs() -> dict[str, RETConfig]:
    return {name: config_for("ret_v21", shape) for name, shape in SHAPES.items()}


def table(
    runs: Path | None,
    timings: Mapping[int, Mapping[str, float]],
    speeds: Mapping[str, float],
    at_step: int | None = None,
    at_minutes: float | None = None,
) -> str:
    """The markdown table: decode ms/step per batch size (`timings[batch][name]`), training
    kB/s, and each run's held-out evaluation."""
    batches = sorted(timings)
    head = ["shape", "conditioning", "MLP", "tokens", "bytes/token", "params"]
    head += [f"decode ms/step @{b}" for b in batches]
    head += ["train kB/s", "steps", "minutes", "held-out loss", "shuffled", "gap", "greedy chrF"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, config in configs().items():
        cells = [
            f"{config.n_layer}×{config.n_embd}",
            config.conditioning,
            str(config.mlp_hidden),
            "bytes" if config.vocab_size == 256 else f"BPE {config.vocab_size}",
            f"{bytes_per_token(config):.2f}",
            f"{RET(config).num_parameters():,}",
        ] + [f"{timings[b][name]:.2f}" for b in batches]
        cells.append(f"{speeds[name]:.1f}")
        row = evaluation(runs / name, at_step, at_minutes) if runs is not None else None
        if row is None:
            cells += ["—"] * 6
        else:
            gap = row["heldout_loss_shuffled"] - row["heldout_loss"]
            cells += [
                str(row["step"]),
                f"{row['minutes']:.1f}",
                f"{row['heldout_loss']:.3f}",
                f"{row['heldout_loss_shuffled']:.3f}",
                f"{gap:.3f}",
                f"{row['heldout_chrf_greedy']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def setting_table(
    shapes: Mapping[str, RETConfig],
    setting: Literal["attention", "dropout"],
    values: Sequence[Any],
    repeats: int,
) -> str:
    """Training kB/s of each shape at each value of one training setting ("attention": the
    kernel, or "dropout"), measured interleaved, and each value's ratio to the first."""
    runs = {f"{name} {v}": config for name, config in shapes.items() for v in values}
    chosen = {f"{n} {v}": v for n in shapes for v in values}
    if setting == "attention":
        speeds = train_kbytes_per_s(runs, repeats=repeats, attention=chosen)
    else:
        speeds = train_kbytes_per_s(runs, repeats=repeats, dropout=chosen)
    labels = [str(v) if setting == "attention" else f"{setting} {v}" for v in values]
    head = [
        "shape",
        *(f"train kB/s, {label}" for label in labels),
        *(f"{label} / {labels[0]}" for label in labels[1:]),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in shapes:
        rates = [speeds[f"{name} {v}"] for v in values]
        cells = [name, *(f"{r:.1f}" for r in rates), *(f"{r / rates[0]:.2f}" for r in rates[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retd.model.shapes", description=__doc__)
    parser.add_argument("--runs", type=Path, help="directory of training runs named as SHAPES")
    parser.add_argument("--at-step", type=int, help="each run's last evaluation at or before")
    parser.add_argument("--at-minutes", type=float, help="... at or before these minutes")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=64, help="decode positions per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: all)")
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["auto"],
        choices=["auto", "math", "default"],
        help="training's attention kernel(s) (TrainConfig.attention); with several, each "
        "shape's training kB/s is measured on each, interleaved, and printed as a table",
    )
    parser.add_argument(
        "--dropout",
        nargs="+",
        type=float,
        help="training dropout(s) (TrainConfig.dropout): each shape's training kB/s at each, "
        "interleaved, printed as a table",
    )
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="these candidates only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = {n: c for n, c in configs().items() if n in (args.shapes or SHAPES)}
    if args.dropout:
        print(setting_table(shapes, "dropout", args.dropout, args.repeats))
        return 0
    if len(args.attention) > 1:
        print(setting_table(shapes, "attention", args.attention, args.repeats))
        return 0
    timings = {b: decode_step_ms(shapes, b, args.steps, args.repeats) for b in args.batches}
    speeds = train_kbytes_per_s(
        shapes, repeats=args.repeats, attention=dict.fromkeys(shapes, args.attention[0])
    )
    print(table(args.runs, timings, speeds, args.at_step, args.at_minutes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
