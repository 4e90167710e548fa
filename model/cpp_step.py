"""RET's decode step as one C++ call (csrc/ret_step.cpp), beside the eager `RET.step`.

The eager step makes ~50 small torch calls a block, each paying Python's dispatch and a GIL
handoff; at batch 1 that overhead is most of a step. The C++ step runs the same ATen
ops on the same shapes in C++ under InferenceMode, with the GIL released once for the whole
step, so its logits and cache writes are bitwise the eager step's
(tests/model/test_cpp_step.py) and greedy outputs are unchanged.

Its prefix attention ("prefix", what "auto" runs) replaces SDPA over the padded batch, which
reads every cache slot up to the furthest row's position, by a kernel that reads each row's
own prefix (a float32 model and cache on the CPU; SDPA elsewhere), and does a layer's RoPE,
cache writes and attention in one pass per row and head instead of ~30 small ATen ops. It
rounds differently from SDPA, so it was measured: on 500 held-out texts, greedy and with the
cards' loop breakers, for the byte and the BPE checkpoint, every output was the SDPA step's
(README, "The decode step in one call"). `-ffp-contract=off` keeps its RoPE's products and
sums rounded one by one, as ATen's ops round them.

The extension is built by torch.utils.cpp_extension (g++ and ninja) on first use and cached
under torch's extensions directory (`TORCH_EXTENSIONS_DIR`, else ~/.cache/torch_extensions),
in a folder per Python and torch install, named by its sources' hash; builders take turns by an
flock, so a build killed half-way (its torch `lock` file left behind) never hangs the next;
`python -m retd.model.cpp_step` builds it ahead of time (the Makefile's install does).

    step = step_function(model, "auto")   # the C++ prefix step if it builds here, else eager
    logits = step(cond, tokens, positions, cache, slots, length, span)
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol, cast

import torch
from torch import Tensor, nn

from .decoding import SamplingParams
from .defaults import STEP_IMPLS
from .model import RET, KVCache
from .sampling import seed_key

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "ret_step.cpp"
HEADER = SOURCE.with_name("ret_decode.h")  # included by SOURCE
_EXTENSION_NAME = "retd_ret_step"

_lock = threading.Lock()
_extension: ModuleType | None = None


class StepFunction(Protocol):
    """RET.step's signature: one new position per row -> logits (B, V)."""

    def __call__(
        self,
        cond: Tensor,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache,
        slots: Tensor,
        length: int | None = None,
        span: int | None = None,
    ) -> Tensor: ...


def load_extension() -> ModuleType:
    """The C++ step's extension module, built on first use (tens of seconds) and loaded
    from torch's cache afterwards; raises if it cannot be built here (no compiler, no ninja)."""
    global _extension
    with _lock:
        if _extension is None:
            started = time.monotonic()
            _extension = build_extension(f"{_EXTENSION_NAME}_{source_digest(SOURCE)}", SOURCE)
            log.info("C++ decode step ready in %.1f s", time.monotonic() - started)
        return _extension


def source_digest(source: Path) -> str:
    """12 hex digits of `source` and the header beside it: in the extension's name, so that
    revisions never share torch's build directory (two daemons of different revisions
    building at once could otherwise each load the other's build)."""
    digest = hashlib.sha256(source.read_bytes())
    digest.update(source.with_name(HEADER.name).read_bytes())
    return digest.hexdigest()[:12]


def build_extension(name: str, source: Path) -> ModuleType:
    """The extension module `name` built from `source` (beside it: the header it includes),
    or loaded from its build directory where it was built from the same files and flags."""
    from torch.utils.cpp_extension import load

    _find_ninja()
    # torch rebuilds when a source or a flag changes: the header's hash is a flag
    header = hashlib.sha256(source.with_name(HEADER.name).read_bytes()).hexdigest()[:16]
    flags = ["-O3", "-ffp-contract=off", f"-DRETD_DECODE_H_{header}"]
    folder = build_directory(name)
    folder.mkdir(parents=True, exist_ok=True)
    # torch guards a build with a `lock` file that a builder killed mid-build leaves behind,
    # and every later load would wait on it forever. The kernel lets go of an flock when its
    # holder dies, and every builder holds this one: held here, a `lock` file is a dead one's.
    with (folder / "retd.flock").open("a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)
        return load(name, [str(source)], extra_cflags=flags, build_directory=str(folder))


def build_directory(name: str) -> Path:
    """Where extension `name` is built and cached: under TORCH_EXTENSIONS_DIR (else torch's
    default root), one folder per Python and torch install, so that two virtual environments
    (their include paths differ) never rebuild over each other's build."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    install = f"{sys.version}|{torch.__version__}|{torch.__file__}".encode()
    return root / f"retd_{hashlib.sha256(install).hexdigest()[:12]}" / name


def _find_ninja() -> None:
    """cpp_extension runs `ninja` from PATH: where there is none (a venv used without being
    activated), the `ninja` wheel's binary (a dependency of retd[server]) is put on it."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja  # type: ignore[import-untyped]
    except ImportError:
        return  # load() then says that ninja is missing
    os.environ["PATH"] = os.pathsep.join((ninja.BIN_DIR, os.environ.get("PATH", "")))


class CppStep:
    """`RET.step` for `model` as one C++ call. It holds the model's weight tensors (not
    copies): build it once the model is on its final device and dtype.

    prefix=True attends with the extension's `prefix_attention` (a float32 cache on the CPU;
    SDPA elsewhere): each row reads only its own cached prefix, where SDPA reads every slot up
    to the furthest row. Not bitwise SDPA's; its greedy outputs are measured for quality."""

    def __init__(
        self, model: RET, prefix: bool = False, extension: ModuleType | None = None
    ) -> None:
        """extension: the built module to run (`build_extension`'s); the project's own by
        default."""
        self.prefix = prefix
        config = model.config
        self._extension = extension or load_extension()
        # RET.condition's weights, for condition_rows (None where the model's class makes its
        # conditioning vector otherwise)
        self._condition = model.condition if type(model).condition is not RET.condition else None
        self._bridge = (
            model.bridge.weight,
            model.ln_bridge.weight,
            model.ln_bridge.bias,
            model.ln_bridge.eps,
        )
        blocks = [
            [
                b.ln_1.weight,
                b.ln_1.bias,
                b.attn.qkv.weight,
                b.attn.proj.weight,
                b.ln_2.weight,
                b.ln_2.bias,
                b.mlp.fc.weight,
                b.mlp.proj.weight,
            ]
            for b, _ in model.layers()
        ]
        self._step = self._extension.RETStep(
            model.wte.weight,
            blocks,
            [cast(nn.Linear, p).weight for _, p in model.layers() if p is not None],
            model.ln_f.weight,
            model.ln_f.bias,
            config.n_head,
            float(config.rope_base),
            model.ln_f.eps,  # every RET LayerNorm has nn.LayerNorm's default eps
            prefix,
        )

    def __call__(
        self,
        cond: Tensor,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache,
        slots: Tensor,
        length: int | None = None,
        span: int | None = None,
        history: Tensor | None = None,
    ) -> Tensor:
        """`history` (S, L) long, if given: each slot's generated tokens, what `decode`'s loop
        breakers read; row b's input token is written to it at its position - 1."""
        if length is None:
            length = int(positions.max()) + 1
        if span is None:
            span = int(slots.max()) + 1
        return self._step.step(
            cond, tokens, positions, cache.k, cache.v, slots, length, span, history
        )

    def condition_rows(
        self,
        cond_cache: Tensor,
        slots: Tensor,
        embeddings: Tensor | None = None,
        embedding_slots: Tensor | None = None,
    ) -> Tensor:
        """The cond rows (B, C) a step reads: cond_cache (S, C)'s rows at slots (B,) long,
        after the joiners' embeddings (J, E) are conditioned (`RET.condition`, the same bits)
        into cond_cache at embedding_slots (J,) long. One C++ call that keeps the GIL, where
        torch ops from Python take ~5, each handing the GIL to other threads and waiting to
        get it back."""
        if self._condition is not None:  # a model class with a condition of its own
            if embeddings is not None:
                cond_cache[embedding_slots] = self._condition(embeddings.to(cond_cache.dtype))
            return cond_cache[slots]
        bridge_w, ln_w, ln_b, eps = self._bridge
        return cast(
            Tensor,
            self._extension.condition_rows(
                cond_cache, slots, embeddings, embedding_slots, bridge_w, ln_w, ln_b, eps
            ),
        )

    def decode(
        self,
        cond: Tensor,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache,
        slots: Tensor,
        span: int,
        history: Tensor,
        controls: RowControls,
        steps: int,
        uniforms: Tensor | None = None,
        draft: Draft | None = None,
        room: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """`steps` decode steps in one call, each row's token fed back as its next input,
        its loop breakers (`controls`) read from `history`: the tokens (steps, B) long and
        their log-probabilities (steps, B) float32 that `sample_batch` gives a step at a time,
        bitwise, greedy and sampled rows alike (`uniforms` (steps, B): the unseeded sampled
        rows' u at each step; a seeded row hashes its seed and position). A row that cannot
        draw gets -1 (NaN). Every row's position + steps
        must be within the cache (its max_length).

        `draft`: speculate on greedy rows' n-gram drafts (prefix attention only): a row may
        then give up to steps * (draft.tokens + 1) tokens, still each the one it would pick a
        step at a time, and rows give different numbers; the tokens are (T, B) with NO_TOKEN
        (model/decoding.py; NaN log-probabilities) after a row's last. `room` (B,) long:
        how many tokens each row may still take; its drafts stay within it (0: the row never
        drafts; None: no bound)."""
        c = controls
        return cast(
            tuple[Tensor, Tensor],
            self._step.decode(
                cond,
                tokens,
                positions,
                cache.k,
                cache.v,
                slots,
                span,
                history,
                c.eos_bias,
                c.penalty,
                c.penalty_n,
                c.ban_n,
                c.eos_id,
                c.temperature,
                c.greedy,
                c.seeded,
                c.keys,
                c.kth_index,
                c.top_p,
                uniforms,
                steps,
                draft.tokens if draft else 0,
                draft.ngram if draft else 1,
                room,
            ),
        )


@dataclass(frozen=True)
class Draft:
    """Speculative decoding of greedy rows on n-gram drafts (prompt lookup on the row's own
    text): at each step, up to `tokens` guesses of what follows, read from where the row's
    last `ngram` tokens occurred before, are checked in the same forward pass."""

    tokens: int
    ngram: int

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.ngram < 1:
            raise ValueError(f"a draft needs tokens >= 1 and ngram >= 1, got {self}")


@dataclass(frozen=True)
class RowControls:
    """What `CppStep.decode` needs of each row's `SamplingParams`, as `SamplingBatch` holds
    them: its loop breakers, (B,) each (the EOS bias, the repetition penalty (1: off) and its
    n-gram size, the no-repeat n-gram size (0: off)), and its draw: the temperature it divides
    by (1 for a greedy row), whether it is greedy, whether it is seeded and its seed's hash
    key, (B,) each; top-k as kth_index (B, 1) (top_k - 1; V - 1 where off) and top-p (B, 1)
    (inf where off), each None when no sampled row uses it."""

    eos_bias: Tensor
    penalty: Tensor
    penalty_n: Tensor
    ban_n: Tensor
    eos_id: int
    temperature: Tensor
    greedy: Tensor
    seeded: Tensor
    keys: Tensor
    kth_index: Tensor | None = None
    top_p: Tensor | None = None
    #: whether a sampled row has no seed: `decode` then needs its u at each step
    needs_uniforms: bool = False

    @classmethod
    def of(cls, params: Sequence[SamplingParams], eos_id: int, vocab_size: int) -> RowControls:
        V = vocab_size
        sampled = [p for p in params if not p.greedy]
        kth_index = top_p = None
        if any(0 < p.top_k < V for p in sampled):
            top_k = [p.top_k if not p.greedy and 0 < p.top_k < V else V for p in params]
            kth_index = torch.tensor([[k - 1] for k in top_k])
        if any(p.top_p < 1 for p in sampled):
            nucleus = [p.top_p if not p.greedy and p.top_p < 1 else float("inf") for p in params]
            top_p = torch.tensor([[x] for x in nucleus])
        return cls(
            torch.tensor([float(p.eos_bias) for p in params]),
            torch.tensor([float(p.repetition_penalty) for p in params]),
            torch.tensor([p.repetition_ngram_size for p in params]),
            torch.tensor([p.no_repeat_ngram_size for p in params]),
            eos_id,
            torch.tensor([1.0 if p.greedy else float(p.temperature) for p in params]),
            torch.tensor([p.greedy for p in params]),
            torch.tensor([p.seed is not None for p in params]),
            torch.tensor([0 if p.seed is None else seed_key(p.seed) for p in params]),
            kth_index,
            top_p,
            any(p.seed is None for p in sampled),
        )


def step_name(step: StepFunction) -> str:
    """Which step `step` is, as `--step-impl` names it: "prefix", "cpp" or "eager"."""
    if isinstance(step, CppStep):
        return "prefix" if step.prefix else "cpp"
    return "eager"


def step_function(model: RET, impl: str = "auto") -> StepFunction:
    """The decode step `impl` names for `model` (see STEP_IMPLS). A model whose class has a
    step of its own runs that one under "auto"."""
    if impl not in STEP_IMPLS:
        raise ValueError(f"step_impl: expected one of {', '.join(STEP_IMPLS)}, got {impl!r}")
    if impl == "eager":
        return model.step
    if type(model).step is not RET.step:  # a module class of its own (register_architecture)
        if impl != "auto":
            raise RuntimeError(
                f"step_impl {impl}: {type(model).__name__} has a decode step of its own; the "
                "C++ step is RET.step's"
            )
        return model.step
    try:
        return CppStep(model, prefix=impl != "cpp")
    except Exception as exc:
        if impl != "auto":
            raise RuntimeError(f"step_impl {impl}: the C++ step cannot be built: {exc}") from exc
        log.warning("the C++ decode step cannot be built here (%s); running eager", exc)
        return model.step


def main() -> None:
    """Build (or find) the extension and check it against the eager step once."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load_extension()
    from .model import ARCHITECTURES

    model = RET(ARCHITECTURES["ret_tiny"]).eval().requires_grad_(False)
    cond = model.condition(torch.randn(2, model.config.embedding_dim))
    args = (torch.tensor([5, 9]), torch.tensor([0, 3]))
    caches = KVCache(model.config, 2), KVCache(model.config, 2)
    slots = torch.tensor([1, 0])
    with torch.inference_mode():
        eager = model.step(cond, *args, caches[0], slots)
        compiled = CppStep(model)(cond, *args, caches[1], slots)
    if not torch.equal(eager, compiled):
        raise SystemExit("the C++ decode step's logits differ from the eager step's")
    print(f"C++ decode step: built, and bitwise the eager step's ({SOURCE.name})")


if __name__ == "__main__":
    main()
