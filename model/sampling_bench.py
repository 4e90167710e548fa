"""What one `sample()` step costs at a server's batch, now and (optionally) at an older revision.

    OMP_NUM_THREADS=1 python -m retd.model.sampling_bench [--batch 64] [--steps 300]
        [--rounds 5] [--baseline REV]

Times one step of token choice on (batch, 256) random logits for four mixes of rows: all
greedy (Decode), all sampled at temperature 1 with a seed (Generate's default), sampled with
top-k 50 and top-p 0.95, and half greedy half sampled. `--baseline REV` also times the
sampler of model/generation.py at git revision REV (the per-row loop before sampling was
batched, with one torch.Generator per row), in the same process, rounds interleaved so a
noisy machine slows both alike. Prints each variant's median microseconds per step.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def load_baseline(revision: str) -> types.ModuleType:
    """model/generation.py as it was at `revision`, imported as a module of this package."""
    source = subprocess.run(
        ["git", "show", f"{revision}:model/generation.py"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    name = "retd.model._baseline_generation"
    module = types.ModuleType(name)
    module.__package__ = "retd.model"
    sys.modules[name] = module
    exec(compile(source, f"{revision}:model/generation.py", "exec"), module.__dict__)
    return module


def batched_step(sampler: Any, logits: Any, params: list[Any]) -> Callable[[], object]:
    """One step of this revision's sampler; .tolist() waits for the result as a server does."""
    return lambda: sampler(logits, params, 5)[0].tolist()


def baseline_step(old: types.ModuleType, logits: Any, params: list[Any]) -> Callable[[], object]:
    """One step of the old sampler: its own SamplingParams, one generator per sampled row."""
    old_params = [old.SamplingParams(**vars(p)) for p in params]
    generators = [None if p.greedy else old.make_generator(p.seed or 0) for p in old_params]
    return lambda: old.sample(logits, old_params, generators)[0].tolist()


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from retd.model.generation import SamplingParams
    from retd.model.sampling import Sampler

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300, help="steps timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", metavar="REV", help="also time the sampler at this revision")
    args = parser.parse_args(argv)
    B = args.batch

    sampled = [SamplingParams(64, temperature=1.0, seed=i) for i in range(B)]
    mixes = {
        "greedy": [SamplingParams(64) for _ in range(B)],
        "sampled t=1": sampled,
        "sampled top-k 50 top-p 0.95": [
            SamplingParams(64, temperature=0.8, top_k=50, top_p=0.95, seed=i) for i in range(B)
        ],
        "half greedy, half sampled": [SamplingParams(64) for _ in range(B // 2)]
        + sampled[B // 2 :],
    }
    logits = torch.randn(B, 256, generator=torch.Generator().manual_seed(0)) * 3
    variants: dict[str, Callable[[], object]] = {}
    for mix, params in mixes.items():
        variants[f"batched  {mix}"] = batched_step(Sampler(), logits, params)
        if args.baseline:
            variants[f"per-row  {mix}"] = baseline_step(
                load_baseline(args.baseline), logits, params
            )

    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for step in variants.values():  # warm-up
            for _ in range(10):
                step()
        for _ in range(args.rounds):
            for name, step in variants.items():
                started = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[name].append((time.perf_counter() - started) / args.steps * 1e6)
    print(f"sample() per step at batch {B}, torch threads {torch.get_num_threads()}: median us")
    for name, values in times.items():
        print(f"  {name:40s} {statistics.median(values):9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
