"""Ways to run RET's decode step as one call, side by side (issue 15's measurement):

    python -m retd.model.step_bench model/checkpoints/ret_v21 --rounds 5

eager (RET.step, op by op), cpp (model/cpp_step.py: the same ATen ops in one C++ call),
prefix (that call with attention over each row's own prefix), torchscript (the same step
scripted: TorchScript's interpreter runs the ops) and compile (torch.compile of RET.step,
dynamic shapes; inductor's C++ kernels). Each decodes 64 positions of a batch of 1 and of 64
greedy rows from fresh caches, the 64 rows once all at one position and once spread (row b
starts at position b, as a continuously batched step holds them), in interleaved rounds; a
way's figure is its best round (ms per step), and "identical" says whether every step's logits
equal the eager step's bit for bit. "prefix, K a call" runs the prefix step K steps in one call
(`CppStep.decode`, what the engine runs with --steps-per-call K): "identical" there says whether
its tokens are eager's argmax at every step (it returns tokens, not logits). `--baseline REV`
adds "prefix (REV)": the C++ step as it was at git revision REV, built as a second extension
and timed in the same rounds (its "identical" compares its logits with the eager step's too),
and its K steps a call beside ours.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import load_checkpoint
from .cpp_step import HEADER, SOURCE, CppStep, RowControls, build_extension
from .decoding import SamplingParams
from .model import RET, KVCache


def _torchscript_rope(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """model.apply_rope, in TorchScript's subset."""
    half = x.shape[-1] // 2
    inv_freq = torch.pow(base, -torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    cos, sin = angles.cos().unsqueeze(-3), angles.sin().unsqueeze(-3)
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def _torchscript_step(
    cond: Tensor,
    tokens: Tensor,
    positions: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    length: int,
    span: int,
    wte: Tensor,
    blocks: list[list[Tensor]],
    ln_f: list[Tensor],
    n_head: int,
    base: float,
) -> Tensor:
    """RET.step (add conditioning), in TorchScript's subset: the same ops in the same order."""
    first = positions == 0
    x = torch.where(first[:, None], cond, F.embedding(tokens.masked_fill(first, 0), wte) + cond)
    x = x[:, None, :]
    B, C = x.shape[0], x.shape[2]
    H, D = n_head, C // n_head
    for layer in range(len(blocks)):
        w = blocks[layer]
        qkv = F.linear(F.layer_norm(x, [C], w[0], w[1], 1e-5), w[2]).split(C, dim=2)
        q = qkv[0].view(B, 1, H, D).transpose(1, 2)
        k = qkv[1].view(B, 1, H, D).transpose(1, 2)
        v = qkv[2].view(B, 1, H, D).transpose(1, 2)
        rotated = _torchscript_rope(torch.cat((q, k), dim=1), positions[:, None], base)
        q, k = rotated[:, :H], rotated[:, H:]
        keys, values = k_cache[layer], v_cache[layer]
        keys[slots, :, positions] = k[:, :, 0]
        values[slots, :, positions] = v[:, :, 0]
        q_at_slot = q.new_zeros(span, H, 1, D)
        q_at_slot[slots] = q
        position_at_slot = positions.new_zeros(span)
        position_at_slot[slots] = positions
        visible = torch.arange(length, device=x.device)[None, :] <= position_at_slot[:, None]
        y = F.scaled_dot_product_attention(
            q_at_slot,
            keys[:span, :, :length],
            values[:span, :, :length],
            attn_mask=visible[:, None, None, :],
        )[slots]
        x = x + F.linear(y.transpose(1, 2).reshape(B, 1, C), w[3])
        h = F.layer_norm(x, [C], w[4], w[5], 1e-5)
        x = x + F.linear(F.gelu(F.linear(h, w[6])), w[7])
    return F.layer_norm(x[:, 0], [C], ln_f[0], ln_f[1], 1e-5) @ wte.T


def ways(model: RET) -> dict[str, Callable[..., Tensor]]:
    """Each way to run a step, with RET.step's signature."""
    config = model.config
    blocks = [
        [p.detach() for p in (b.ln_1.weight, b.ln_1.bias, b.attn.qkv.weight, b.attn.proj.weight,
                              b.ln_2.weight, b.ln_2.bias, b.mlp.fc.weight, b.mlp.proj.weight)]
        for b, _ in model.layers()
    ]  # fmt: skip
    ln_f = [model.ln_f.weight.detach(), model.ln_f.bias.detach()]
    scripted: Any = torch.jit.script(_torchscript_step)
    constants = (model.wte.weight, blocks, ln_f, config.n_head, float(config.rope_base))

    def torchscript(cond: Tensor, tokens: Tensor, positions: Tensor, cache: KVCache,
                    slots: Tensor, length: int, span: int) -> Tensor:  # fmt: skip
        return scripted(cond, tokens, positions, cache.k, cache.v, slots, length, span, *constants)

    found: dict[str, Callable[..., Tensor]] = {
        "eager": model.step,
        "cpp": CppStep(model),
        "prefix": CppStep(model, prefix=True),
    }
    if config.conditioning == "add":  # the scripted step has no per-layer conditioning
        found["torchscript"] = torchscript
    found["compile"] = torch.compile(model.step, dynamic=True)
    return found


def run(
    step: Callable[..., Tensor], model: RET, batch: int, steps: int, spread: bool = False
) -> tuple[Tensor, float]:
    """`steps` greedy positions of `batch` rows from a fresh cache: the logits and ms/step.
    spread: row b starts at position b (its earlier positions hold zeros), not at 0."""
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(batch, model.config.embedding_dim, generator=generator)
    with torch.inference_mode():
        cond = model.condition(embeddings)
        cache = KVCache(model.config, batch)
        slots = torch.arange(batch)
        tokens = torch.zeros(batch, dtype=torch.long)
        logits = []
        started = time.perf_counter()
        offsets = torch.arange(batch) if spread else torch.zeros(batch, dtype=torch.long)
        for position in range(steps):
            positions = offsets + position
            length = int(offsets[-1]) + position + 1
            logits.append(step(cond, tokens, positions, cache, slots, length, batch))
            tokens = logits[-1].argmax(-1)
        seconds = time.perf_counter() - started
    return torch.stack(logits), seconds / steps * 1000


def run_calls(
    step: CppStep, model: RET, batch: int, steps: int, spread: bool = False, per_call: int = 4
) -> tuple[Tensor, float]:
    """`run` with `per_call` greedy steps in each call of `step.decode`: the tokens (steps, B)
    and ms/step."""
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(batch, model.config.embedding_dim, generator=generator)
    greedy = [SamplingParams(max_new_tokens=steps)] * batch
    controls = RowControls.of(greedy, model.config.eos_id, model.config.vocab_size)
    with torch.inference_mode():
        cond = model.condition(embeddings)
        cache = KVCache(model.config, batch)
        history = torch.zeros(batch, model.config.max_length, dtype=torch.long)
        slots = torch.arange(batch)
        tokens = torch.zeros(batch, dtype=torch.long)
        chosen = []
        started = time.perf_counter()
        offsets = torch.arange(batch) if spread else torch.zeros(batch, dtype=torch.long)
        for position in range(0, steps, per_call):
            n = min(per_call, steps - position)
            out, _ = step.decode(
                cond, tokens, offsets + position, cache, slots, batch, history, controls, n
            )
            chosen.append(out)
            tokens = out[-1]
        seconds = time.perf_counter() - started
    return torch.cat(chosen), seconds / steps * 1000


REPO = SOURCE.parent.parent.parent  # model/csrc/ret_step.cpp -> the repository


def baseline_extension(revision: str) -> ModuleType:
    """The C++ step's extension as its sources were at git revision `revision`."""
    with tempfile.TemporaryDirectory(prefix="retd-step-baseline-") as where:
        folder = Path(where)
        for path in (SOURCE, HEADER):
            relative = path.relative_to(REPO).as_posix()
            shown = subprocess.run(
                ["git", "show", f"{revision}:{relative}"], cwd=REPO, capture_output=True, check=True
            )
            (folder / path.name).write_bytes(shown.stdout)
        return build_extension("retd_ret_step_baseline", folder / SOURCE.name)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m retd.model.step_bench", description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per-call", type=int, default=4, help="steps a call of decode")
    parser.add_argument("--baseline", metavar="REV", help="also time the C++ step at this revision")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint).model
    found = ways(model)
    baseline = f"prefix ({args.baseline})"
    if args.baseline:
        old = baseline_extension(args.baseline)
        found[baseline] = CppStep(model, prefix=True, extension=old)
    print("| batch | way | ms/step (best round) | × eager | identical to eager |")
    print("| ---: | --- | ---: | ---: | --- |")
    for batch, spread in ((1, False), (64, False), (64, True)):
        label = f"{batch}, spread" if spread else str(batch)
        reference, _ = run(model.step, model, batch, args.steps, spread)
        for step in found.values():
            run(step, model, batch, args.steps, spread)  # warm-up (compiles)
        best = {name: float("inf") for name in found}
        same = dict.fromkeys(found, True)
        for _ in range(args.rounds):
            for name, step in found.items():
                logits, ms = run(step, model, batch, args.steps, spread)
                best[name] = min(best[name], ms)
                same[name] = same[name] and torch.equal(logits, reference)
        decoders = {"prefix": cast(CppStep, found["prefix"])}
        if args.baseline:
            decoders[baseline] = cast(CppStep, found[baseline])
        for decoder in decoders.values():
            run_calls(decoder, model, batch, args.steps, spread)  # warm-up
        calls = {name: float("inf") for name in decoders}
        chosen_same = dict.fromkeys(decoders, True)
        for _ in range(args.rounds):  # the decoders in turn, round after round
            for name, decoder in decoders.items():
                chosen, ms = run_calls(decoder, model, batch, args.steps, spread, args.per_call)
                calls[name] = min(calls[name], ms)
                chosen_same[name] = chosen_same[name] and torch.equal(chosen, reference.argmax(-1))
        for name in decoders:
            best[f"{name}, {args.per_call} a call"] = calls[name]
            same[f"{name}, {args.per_call} a call"] = chosen_same[name]
        for name in best:
            print(f"| {label} | {name} | {best[name]:.3f} | {best['eager'] / best[name]:.2f} | "
                  f"{'yes' if same[name] else 'no'} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
