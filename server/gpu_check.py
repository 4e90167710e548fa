"""`make gpu-check`: what retd does on one NVIDIA GPU, measured in one run of a few minutes.

    python -m retd.server.gpu_check --out DIR            # on a machine with a CUDA device
    python -m retd.server.gpu_check --out DIR --device cpu --quick   # its logic, on a CPU

Steps, each recorded with its seconds and its outcome, so that one failing step never hides
the others:

1. ``cuda_tests``: the CUDA tests of the suite (``tests/test_devices.py``, the checkpoint's
   device tests) under pytest, with their pass/fail/skip counts (a skip on a GPU is a failure);
2. ``raw``: the model alone through ``generate()``, float32 and bfloat16, batch 1 and 64:
   decode ms/step and sequences/s, and whether greedy outputs equal the CPU's (float32);
3. ``memory``: device memory for the weights and the peak over a batch of 1 and of 64 calls of
   full length (the seed's promise: under 200 MB for a call);
4. ``server``: ``retd bench`` against a server on the device, float32 and bfloat16, greedy
   ``Decode`` and sampled ``Generate`` at 64 callers and ``Decode`` at 1 caller;
5. ``cuda_graphs``: whether the step runs as CUDA graphs (not built yet: said so).

It writes ``gpu_check.json`` and ``gpu_check.md`` (one table) under ``--out`` and exits 1 when
a step failed, 2 when there is no CUDA device (unless ``--device cpu``): never a silent skip.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CUDA_TESTS = ["tests/test_devices.py", "tests/model/test_ret_checkpoint.py"]
MEMORY_LIMIT_MB = 200.0
NO_DEVICE = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retd.server.gpu_check", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="where the JSON and table go")
    parser.add_argument("--checkpoint", type=Path, help="default: the shipped ret_v21")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="short loads (for testing it)")
    args = parser.parse_args(argv)
    import torch

    from retd.model.checkpoint import DEFAULT_CHECKPOINT

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA device here (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}): run it on a machine with one NVIDIA GPU "
            "(or --device cpu to try its logic)",
            file=sys.stderr,
        )
        return NO_DEVICE
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    report: dict[str, Any] = {"device": _device_name(args.device), "steps": {}}
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("cuda_tests", lambda: cuda_tests(args.device, args.quick)),
        ("raw", lambda: raw(checkpoint, args.device, args.quick)),
        ("memory", lambda: memory(checkpoint, args.device)),
        ("server", lambda: server(checkpoint, args.device, args.quick)),
        ("cuda_graphs", lambda: {"ok": True, "built": False, "note": "not built yet"}),
    ]
    for name, step in steps:
        started = time.perf_counter()
        try:
            result = step()
        except Exception as exc:  # one failing step is recorded; the next ones still run
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.perf_counter() - started, 1)
        report["steps"][name] = result
        print(f"gpu-check: {name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(s["ok"] for s in report["steps"].values()) else 1


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"cpu, torch {torch.__version__}"


def cuda_tests(device: str, quick: bool) -> dict[str, Any]:
    """The suite's CUDA tests; on a GPU a skipped one counts as a failure."""
    selection = ["-k", "cuda"] + (["-x"] if quick else [])
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS, *selection],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = (completed.stdout.strip().splitlines() or [""])[-1]
    counts = {k: _count(last, k) for k in ("passed", "failed", "skipped", "error")}
    ok = counts["failed"] == 0 and counts["error"] == 0
    if device == "cuda":
        ok = ok and counts["skipped"] == 0 and counts["passed"] > 0
    failures = {} if ok else {"output_tail": (completed.stdout + completed.stderr)[-3000:]}
    return {"ok": ok, **counts, "summary": last, **failures}


def _count(summary: str, word: str) -> int:
    words = summary.replace(",", " ").split()
    return sum(int(words[i - 1]) for i, w in enumerate(words) if w.startswith(word) and i > 0)


def raw(checkpoint: Path, device: str, quick: bool) -> dict[str, Any]:
    """generate() alone: ms per decode step at batch 1 and 64, float32 and bfloat16."""
    import torch

    from retd.model.checkpoint import load_checkpoint
    from retd.model.generation import SamplingParams, generate

    new = 16 if quick else 64
    rows: dict[str, Any] = {}
    embeddings = torch.randn(64, 768, generator=torch.Generator().manual_seed(0))
    on_cpu = load_checkpoint(checkpoint)
    tokenizer = on_cpu.tokenizer
    reference = generate(on_cpu.model, embeddings, [SamplingParams(new)] * 64, tokenizer=tokenizer)
    for dtype in ("float32", "bfloat16"):
        model = load_checkpoint(checkpoint, device=device, dtype=getattr(torch, dtype)).model
        for batch in (1, 64):
            params = [SamplingParams(new)] * batch
            inputs = embeddings[:batch].to(device)
            generate(model, inputs, params, tokenizer=tokenizer)  # warm-up
            _sync(device)
            runs = 2 if quick else 10
            started = time.perf_counter()
            for _ in range(runs):
                results = generate(model, inputs, params, tokenizer=tokenizer)
            _sync(device)
            seconds = (time.perf_counter() - started) / runs
            steps = max(len(r.token_ids) for r in results)  # the batch runs until its longest
            rows[f"{dtype}@{batch}"] = {
                "ms_per_step": round(1000 * seconds / steps, 3),
                "sequences_per_s": round(batch / seconds, 1),
            }
        if dtype == "float32":
            outputs = generate(
                model, embeddings.to(device), [SamplingParams(new)] * 64, tokenizer=tokenizer
            )
            same = sum(a.text == b.text for a, b in zip(outputs, reference, strict=True))
            rows["float32_greedy_equal_to_cpu"] = f"{same}/64"
    return {"ok": True, "rows": rows}


def memory(checkpoint: Path, device: str) -> dict[str, Any]:
    """Device memory: the weights, then the peak over 1 and 64 calls of full length."""
    import torch

    from retd.model.checkpoint import load_checkpoint
    from retd.model.generation import SamplingParams, generate

    if device != "cuda":
        return {"ok": True, "note": "device memory is measured on CUDA only"}
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    loaded = load_checkpoint(checkpoint, device="cuda")
    model = loaded.model
    weights = torch.cuda.memory_allocated() - base
    figures: dict[str, Any] = {"weights_mb": round(weights / 2**20, 2)}
    full = model.config.max_length - 1
    for batch in (1, 64):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        params = [SamplingParams(full)] * batch  # the KV cache is sized for `full` bytes
        generate(model, torch.randn(batch, 768, device="cuda"), params, tokenizer=loaded.tokenizer)
        peak = torch.cuda.max_memory_allocated() - before
        figures[f"peak_mb@{batch}"] = round(peak / 2**20, 2)
        figures[f"per_call_mb@{batch}"] = round((peak + weights) / batch / 2**20, 2)
    ok = figures["per_call_mb@1"] < MEMORY_LIMIT_MB
    return {"ok": ok, "limit_mb": MEMORY_LIMIT_MB, **figures}


def server(checkpoint: Path, device: str, quick: bool) -> dict[str, Any]:
    """`retd bench` against a server on the device: greedy and sampled, 64 callers and 1."""
    duration = "2" if quick else "8"
    loads = [("decode", 64), ("generate", 64), ("decode", 1)]
    rows: dict[str, Any] = {}
    ok = True
    for dtype in ("float32", "bfloat16"):
        for mode, callers in loads:
            if quick and (dtype, callers) != ("float32", 64):
                continue
            command = [
                sys.executable, "-m", "retd.server.cli", "bench", "--checkpoint", str(checkpoint),
                "--server-args", f"--device {device} --dtype {dtype}", "--mode", mode,
                "--concurrency", str(callers), "--duration", duration, "--json",
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, timeout=180)
            if done.returncode != 0:
                rows[f"{dtype} {mode} x{callers}"] = {"error": done.stderr.strip()[-500:]}
                ok = False
                continue
            bench = json.loads(done.stdout.strip().splitlines()[-1])
            rows[f"{dtype} {mode} x{callers}"] = {
                "requests_per_s": round(bench["requests_per_s"], 1),
                "bytes_per_s": round(bench["tokens_per_s"], 1),
                "p50_ms": round(bench["latency_ms"]["p50"], 2),
                "p99_ms": round(bench["latency_ms"]["p99"], 2),
                "errors": bench.get("errors", {}),
            }
            ok = ok and not bench.get("errors")
    return {"ok": ok, "rows": rows}


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def markdown(report: dict[str, Any]) -> str:
    """One table: each step's figures, flattened to `name: value` cells."""
    lines = [f"gpu-check on {report['device']}", "", "| step | ok | seconds | figures |"]
    lines.append("|---|---|---:|---|")
    for name, step in report["steps"].items():
        figures = {k: v for k, v in step.items() if k not in ("ok", "seconds")}
        cells = "; ".join(f"{k}: {_flat(v)}" for k, v in figures.items())
        lines.append(
            f"| {name} | {'yes' if step['ok'] else '**no**'} | {step['seconds']} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flat(v)}" for k, v in value.items()) + "}"
    return str(value).replace("|", "/")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
