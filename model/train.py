"""`retd train`: teacher-forced training of a RET decoder on (embedding, text) pairs.

AdamW with linear warmup and cosine decay, gradient clipping, Gaussian noise on the input
embeddings (re-normalised, as the encoder's outputs are unit vectors), length-bucketed
batches (little padding), a JSONL metrics log, periodic checkpoints and `--resume`.

The sign that the decoder reads the embedding is the held-out loss gap: the loss with each
text's own embedding against the loss with the embeddings shuffled across the batch. It is
logged at every evaluation, beside greedy chrF on a held-out slice.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from retd.model.batches import (
    bucketed_batches,
    byte_lengths,
    drop_tokens,
    encode_texts,
    make_batch,
)
from retd.model.checkpoint import DEFAULT_ENCODER, save_checkpoint
from retd.model.encoder import ENCODER_WEIGHTS_SHA256
from retd.model.evaluate import greedy_texts, text_scores
from retd.model.loss import heldout_losses, heldout_set, sequence_loss
from retd.model.model import RET, model_class
from retd.model.run_setup import model_config_for, resolve_tokenizer, toml_over_base, warm_start


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; read from a TOML file (`retd train --config`)."""

    data_dir: str = "build/data"
    out_dir: str = "build/train/ret_v21"
    architecture: str = "ret_v21"
    # RETConfig fields that differ from the architecture's (a shape search: `[model]` in TOML).
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    batch_size: int = 128
    learning_rate: float = 3e-3
    bridge_lr_scale: float = 1.0  # the bridge's learning rate is learning_rate times this
    min_lr_ratio: float = 0.1  # the cosine decays to learning_rate times this
    warmup_steps: int = 300
    max_steps: int = 20_000
    # A budget of training time (summed over resumes; evaluations not counted): when set,
    # training ends at max_steps or max_minutes, whichever comes first, and the cosine decays
    # over whichever is nearer, so a slow machine still ends at a low learning rate.
    max_minutes: float = 0.0
    stop_at_step: int = 0  # pause (and save) at this step, to go on with --resume; 0 = never
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    embedding_noise: float = 0.0  # std of Gaussian noise per dimension, before re-normalising
    # Dropout on the attention weights and the blocks' residual branches (RET.set_dropout),
    # for runs that make many passes over their corpus; 0 = none.
    dropout: float = 0.0
    # The share of input tokens replaced by the end-of-sequence token in training (word
    # dropout; the targets stay whole): the decoder must take more of the text from the
    # embedding. 0 = none.
    token_dropout: float = 0.0
    eval_every: int = 500
    eval_texts: int = 256  # held-out texts for the loss gap and greedy chrF at each evaluation
    save_every: int = 500
    # A cap on a batch's rows times its longest row in tokens (0 = none): batches of long
    # texts get fewer rows. At batch 4,096 a bucket of 255-token texts took 23-43 GB of a
    # GPU per run (BENCHMARKS.md); 4,096 x 48 keeps the usual batches whole.
    max_batch_tokens: int = 0
    threads: int = 0  # 0 = every core this process may use
    version: str = "2.1.0"
    # "bfloat16": the training step's matrix products in bfloat16 (torch.autocast; weights,
    # optimizer state and the loss stay float32): twice the steps per minute on a CPU with
    # AVX512-BF16 (measured here: 91 vs 189 ms per step of 128 texts). "none": float32.
    autocast: str = "none"
    # The attention kernel of the training step. "auto": PyTorch's math kernel (matrix products
    # and a softmax) on a CPU, whose flash-attention backward took 44% of a step of the shipped
    # shape (1.64x the bytes/s without it, BENCHMARKS.md), and PyTorch's own choice on a GPU;
    # "math"; "default": PyTorch's own choice everywhere.
    attention: str = "auto"
    # Where the step runs: "cpu", or "cuda" on a machine with an NVIDIA GPU (`make gpu-train`
    # on a lent one). The exported checkpoint is on the CPU either way.
    device: str = "cpu"
    # Export the checkpoint only at evaluations that lower the held-out loss (early stopping,
    # for runs that make many passes over a small corpus): checkpoint/ is then the best one
    # evaluated since the process started.
    keep_best: bool = False
    # Compile the training step's forward pass (torch.compile, dynamic shapes): fuses the
    # small elementwise ops that dominate a thin model's step on a CPU (BENCHMARKS.md).
    compile: bool = False
    # A checkpoint directory whose weights start the run instead of seeded random ones (a
    # warm start: the optimizer and the schedule start afresh); unused when --resume finds a
    # saved state. Its card's training record is kept in the new card.
    init_from: str = ""
    # The tokenizer: a tokenizer.json (`retd tokenizer` makes one); "" = init_from's
    # checkpoint's, else bytes. The model's vocab_size follows it.
    tokenizer: str = ""

    @classmethod
    def from_toml(cls, path: Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        values = toml_over_base(path)
        values.update(overrides or {})
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) in {path}: {', '.join(unknown)}")
        return cls(**values)


def add_noise(embeddings: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    if std <= 0:
        return embeddings
    noise = torch.randn(embeddings.shape, generator=generator, device=embeddings.device) * std
    return F.normalize(embeddings + noise, dim=-1)


ATTENTION_KERNELS = ("auto", "math", "default")


def attention_kernel(choice: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Where the training step's attention runs (TrainConfig.attention): PyTorch's math kernel
    for "math", and for "auto" on a CPU; else whatever PyTorch picks."""
    if choice == "math" or (choice == "auto" and device.type == "cpu"):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def lr_at(step: int, config: TrainConfig, minutes: float = 0.0) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr_ratio of it, over the steps
    or (with max_minutes) the training minutes, whichever is further along."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    if config.max_minutes:
        progress = max(progress, minutes / config.max_minutes)
    progress = min(1.0, progress)
    floor = config.min_lr_ratio
    return config.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: RET, config: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only; the bridge in its own group (its own learning rate)."""
    groups: dict[str, list[torch.nn.Parameter]] = {"bridge": [], "decay": [], "no_decay": []}
    for name, param in model.named_parameters():
        if name.startswith("bridge."):
            groups["bridge"].append(param)
        elif param.dim() >= 2:
            groups["decay"].append(param)
        else:
            groups["no_decay"].append(param)
    return torch.optim.AdamW(
        [
            {
                "params": groups["bridge"],
                "weight_decay": config.weight_decay,
                "lr_scale": config.bridge_lr_scale,
            },
            {"params": groups["decay"], "weight_decay": config.weight_decay, "lr_scale": 1.0},
            {"params": groups["no_decay"], "weight_decay": 0.0, "lr_scale": 1.0},
        ],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
    )


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train until max_steps (or max_minutes); returns the exported checkpoint's directory."""
    from tqdm import tqdm

    from retd.model.embed import count_shards, load_split

    if config.autocast not in ("none", "bfloat16"):
        raise ValueError(f"autocast: expected 'none' or 'bfloat16', got {config.autocast!r}")
    bf16 = config.autocast == "bfloat16"
    if config.attention not in ATTENTION_KERNELS:
        raise ValueError(
            f"attention: expected one of {', '.join(ATTENTION_KERNELS)}, got {config.attention!r}"
        )
    for name in ("dropout", "token_dropout"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"{name}: expected a number in [0, 1), got {getattr(config, name)!r}")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' but torch sees no CUDA device here")
    torch.set_num_threads(config.threads or len(os.sched_getaffinity(0)))
    data_dir, out_dir = Path(config.data_dir), Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, log_path = out_dir / "state.pt", out_dir / "metrics.jsonl"

    tokenizer = resolve_tokenizer(config)
    model_config = model_config_for(config, tokenizer)

    def load_train() -> tuple[int, list[np.ndarray], np.ndarray, np.ndarray, torch.Tensor]:
        shards = count_shards(data_dir, "train")
        split = load_split(data_dir, "train")
        encoded = encode_texts(split.texts, model_config.max_length, tokenizer)
        lengths = np.array([len(ids) for ids in encoded])
        sizes = byte_lengths(encoded, tokenizer)
        # On a GPU the whole split's embeddings live there (951k texts: 2.9 GB), so a step
        # gathers its rows and draws their noise on the device, not on the host.
        embeddings = torch.from_numpy(split.embeddings.astype(np.float32)).to(device)
        return shards, encoded, lengths, sizes, embeddings

    # Training may start while `retd embed` is still running: each epoch takes in the shards
    # that have been completed since the last.
    shards, encoded, lengths, sizes, train_embeddings = load_train()
    heldout_split = load_split(data_dir, "heldout")
    if not encoded or not heldout_split.texts:
        raise ValueError(f"no embedded texts under {data_dir}: run `retd corpus` and `retd embed`")
    n_eval = min(config.eval_texts, len(heldout_split.texts))
    eval_texts, eval_embeddings, eval_encoded = heldout_set(
        heldout_split, n_eval, model_config.max_length, tokenizer
    )
    eval_embeddings = eval_embeddings.to(device)

    torch.manual_seed(config.seed)
    model = model_class(config.architecture)(model_config)
    model.init_weights(generator=torch.Generator().manual_seed(config.seed))
    warm_record = warm_start(model, config) if config.init_from else None
    model.set_dropout(config.dropout)
    model.to(device)
    optimizer = make_optimizer(model, config)
    forward = torch.compile(model, dynamic=True) if config.compile else model
    noise_generator = torch.Generator(device).manual_seed(config.seed + 1)
    step, epoch, next_batch, seen_bytes, elapsed = 0, 0, 0, 0, 0.0
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False, map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        noise_generator.set_state(state["noise_generator"])
        step, epoch, next_batch = state["step"], state["epoch"], state["next_batch"]
        if log_path.exists():  # drop what was logged after the saved state
            kept = [
                line
                for line in log_path.read_text(encoding="utf-8").splitlines(keepends=True)
                if json.loads(line)["step"] <= step
            ]
            log_path.write_text("".join(kept), encoding="utf-8")
        if state["texts"] != len(encoded):  # more shards since: their epoch's batches differ
            epoch, next_batch = epoch + 1, 0
        seen_bytes, elapsed = state["bytes"], state["elapsed"]

    def save_state() -> None:
        partial = state_path.with_suffix(".partial")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "noise_generator": noise_generator.get_state(),
                "step": step,
                "epoch": epoch,
                "next_batch": next_batch,
                "texts": len(encoded),
                "bytes": seen_bytes,
                "elapsed": elapsed,
                "config": dataclasses.asdict(config),
            },
            partial,
        )
        partial.rename(state_path)

    def export(metrics: dict[str, Any]) -> Path:
        card = {
            "version": config.version,
            "trained": True,
            "encoder": {
                **DEFAULT_ENCODER,
                "weights_sha256": ENCODER_WEIGHTS_SHA256,
                "pooling": "masked mean over tokens, then L2 normalisation",
            },
            "training": {
                "steps": step,
                "epochs": epoch,
                "bytes": seen_bytes,
                "minutes": round(elapsed / 60, 1),
                "texts": len(encoded),
                "corpus": _corpus_card(data_dir),
                "config": dataclasses.asdict(config),
                **({"init_from": warm_record} if warm_record is not None else {}),
            },
            "metrics": metrics,
        }
        return save_checkpoint(
            copy.deepcopy(model).cpu() if device.type != "cpu" else model,
            out_dir / "checkpoint",
            architecture=config.architecture,
            card=card,
            tokenizer=tokenizer,
        )

    def evaluate() -> dict[str, Any]:
        true_loss, shuffled_loss = heldout_losses(model, eval_embeddings, eval_encoded, tokenizer)
        model.eval()
        decoded = greedy_texts(
            model, eval_embeddings, model_config.max_length - 1, tokenizer=tokenizer
        )
        model.train()
        scores = text_scores(decoded, eval_texts)
        return {
            "step": step,
            "heldout_loss": round(true_loss, 4),
            "heldout_loss_shuffled": round(shuffled_loss, 4),
            "heldout_chrf_greedy": round(scores["chrf"], 2),
            "sample": {"reference": eval_texts[0], "decoded": decoded[0]},
        }

    model.train()
    bar = tqdm(
        total=config.max_steps, initial=step, desc="train", unit="step", disable=not progress
    )
    budget_s = config.max_minutes * 60 if config.max_minutes else math.inf
    last_metrics: dict[str, Any] = {}
    best = math.inf  # the lowest held-out loss exported (keep_best)

    last_step = min(config.max_steps, config.stop_at_step or config.max_steps)

    def done() -> bool:
        return step >= last_step or elapsed >= budget_s

    with log_path.open("a", encoding="utf-8") as log:
        while not done():
            if next_batch == 0 and count_shards(data_dir, "train") != shards:
                shards, encoded, lengths, sizes, train_embeddings = load_train()
                bar.write(f"epoch {epoch}: {len(encoded)} texts from {shards} shards")
            epoch_rng = np.random.default_rng([config.seed, epoch])
            batches = list(
                bucketed_batches(lengths, config.batch_size, epoch_rng, config.max_batch_tokens)
            )
            while next_batch < len(batches) and not done():
                rows = batches[next_batch]
                next_batch += 1
                started = time.perf_counter()
                lr = lr_at(step, config, elapsed / 60)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                inputs, targets = make_batch(encoded, rows, model_config.eos_id)
                emb = add_noise(
                    train_embeddings[torch.from_numpy(rows).to(device)],
                    config.embedding_noise,
                    noise_generator,
                )
                inputs, targets = inputs.to(device), targets.to(device)
                inputs = drop_tokens(
                    inputs, config.token_dropout, model_config.eos_id, noise_generator
                )
                with (
                    attention_kernel(config.attention, device),
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
                ):
                    loss = sequence_loss(forward, emb, inputs, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                step += 1
                batch_bytes = int(sizes[rows].sum()) + len(rows)  # text bytes and EOS
                seen_bytes += batch_bytes
                took = time.perf_counter() - started
                elapsed += took
                record: dict[str, Any] = {
                    "step": step,
                    "epoch": epoch,
                    "loss": round(loss.item(), 4),
                    "lr": lr,
                    "grad_norm": round(float(grad_norm), 3),
                    "bytes_per_s": round(batch_bytes / took),
                    "minutes": round(elapsed / 60, 2),
                }
                if step % config.eval_every == 0:
                    last_metrics = evaluate()
                    record.update(last_metrics)
                    bar.write(json.dumps(record))
                    if config.keep_best and last_metrics["heldout_loss"] < best:
                        best = last_metrics["heldout_loss"]
                        export(last_metrics)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=record["loss"], lr=f"{lr:.2e}")
                if step % config.save_every == 0:
                    save_state()
                    if not config.keep_best:
                        export(last_metrics)
            if next_batch >= len(batches):
                epoch += 1
                next_batch = 0
    bar.close()
    save_state()
    if last_metrics.get("step") != step:
        last_metrics = evaluate()
    if not config.keep_best or last_metrics["heldout_loss"] < best:
        export(last_metrics)
    return out_dir / "checkpoint"


def _corpus_card(data_dir: Path) -> dict[str, Any]:
    path = data_dir / "corpus" / "corpus.json"
    return json.loads(path.read_text()) if path.exists() else {}
