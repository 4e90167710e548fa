"""RET checkpoints: a directory with model.safetensors (fp32 weights) and card.json (metadata).

card.json holds at least: format, architecture, config, version, trained, encoder {name, dim},
training {...}, metrics {...}. Its `kind` names the kind of model (`ret` here; a card without
one is a RET card); the other kinds load through their own modules (`phrase_bank`:
retd.model.phrase_bank).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .encoder import sha256_file
from .kinds import (  # torch-free, for the server's front end; re-exported here
    CARD_FILE as CARD_FILE,
)
from .kinds import (
    CARD_FORMAT,
    RET_KIND,
    CheckpointError,
    read_card,
)
from .kinds import DEFAULT_CHECKPOINT as DEFAULT_CHECKPOINT
from .kinds import KINDS as KINDS
from .kinds import PHRASE_BANK_KIND as PHRASE_BANK_KIND
from .kinds import checkpoint_kind as checkpoint_kind
from .model import ARCHITECTURES, RET, RETConfig, config_for, model_class
from .tokenizer import BYTES, TOKENIZER_FILE, Tokenizer

WEIGHTS_FILE = "model.safetensors"

DEFAULT_ENCODER: Mapping[str, Any] = MappingProxyType(
    {"name": "sentence-transformers/all-mpnet-base-v2", "dim": 768}
)

_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
)


def parse_dtype(name: str) -> torch.dtype:
    """float32/fp32, bfloat16/bf16, float16/fp16/half -> torch dtype; ValueError otherwise."""
    key = name.strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(_DTYPES)}")
    return _DTYPES[key]


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; anything else as torch.device understands it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference, with where it came from."""

    model: RET  # eval mode, on device/dtype, requires_grad False
    architecture: str
    config: RETConfig
    card: dict[str, Any]
    sha256: str  # of the weights file
    path: Path
    tokenizer: Tokenizer = BYTES  # tokenizer.json beside the weights; none: bytes

    @property
    def trained(self) -> bool:
        return bool(self.card["trained"])

    @property
    def version(self) -> str:
        return str(self.card["version"])


def atomic_write(path: Path, write: Any) -> None:
    """Write via a temporary file in the same directory, then rename over path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_card(directory: Path, card: Mapping[str, Any]) -> None:
    """`directory`/card.json, indented with sorted keys, written atomically."""
    text = json.dumps(card, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CARD_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_checkpoint(
    model: RET,
    directory: str | Path,
    *,
    architecture: str,
    card: Mapping[str, Any],
    tokenizer: Tokenizer = BYTES,
) -> Path:
    """Write model.safetensors (fp32), card.json and (unless it is the byte tokenizer)
    tokenizer.json into directory; return the directory."""
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}"
        )
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        )
    config = model.config
    encoder = dict(card.get("encoder", DEFAULT_ENCODER))
    if encoder.get("dim") != config.embedding_dim:
        raise ValueError(
            f"encoder {encoder.get('name')!r} has dim {encoder.get('dim')!r} but the model's "
            f"embedding_dim is {config.embedding_dim}"
        )
    full_card: dict[str, Any] = {
        **dict(card),
        "format": CARD_FORMAT,
        "kind": RET_KIND,
        "architecture": architecture,
        "config": config.to_dict(),
        "version": str(card.get("version", "unversioned")),
        "trained": bool(card.get("trained", False)),
        "encoder": encoder,
        "training": dict(card.get("training", {})),
        "metrics": dict(card.get("metrics", {})),
        "tokenizer": tokenizer.card(),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer.kind != "bytes":
        spec = tokenizer.to_json()
        atomic_write(
            directory / TOKENIZER_FILE,
            lambda tmp: Path(tmp).write_text(spec, encoding="utf-8"),
        )
    elif (directory / TOKENIZER_FILE).exists():
        (directory / TOKENIZER_FILE).unlink()
    # The head is tied to wte and owns no tensor, so every tensor is stored exactly once.
    tensors = {
        name: t.detach().to("cpu", torch.float32).contiguous()
        for name, t in model.state_dict().items()
    }
    atomic_write(
        directory / WEIGHTS_FILE,
        lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
    )
    full_card["weights_sha256"] = sha256_file(directory / WEIGHTS_FILE)
    write_card(directory, full_card)
    return directory


def init_checkpoint(
    directory: str | Path,
    *,
    seed: int = 0,
    architecture: str = "ret_v21",
    shape: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of seeded random (untrained) weights; return the directory. `shape`:
    RETConfig fields that differ from the architecture's (the card records the config)."""
    model = model_class(architecture)(config_for(architecture, shape))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    card = {
        "version": "2.1.0-untrained",
        "trained": False,
        "encoder": dict(DEFAULT_ENCODER),
        "training": {"init_seed": seed},
        "metrics": {},
    }
    return save_checkpoint(model, directory, architecture=architecture, card=card)


def _read_card(path: Path) -> dict[str, Any]:
    card = read_card(path)
    kind = card.get("kind", RET_KIND)
    if kind != RET_KIND:
        raise CheckpointError(f"{path} describes a {kind!r} model, not a {RET_KIND!r} one")
    for key in ("architecture", "version", "trained", "encoder"):
        if key not in card:
            raise CheckpointError(f"{path} lacks the key {key!r}")
    return card


def _config_from_card(card: Mapping[str, Any], path: Path) -> tuple[str, RETConfig]:
    architecture = card["architecture"]
    if architecture not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unknown architecture {architecture!r}; "
            f"known: {', '.join(sorted(ARCHITECTURES))}"
        )
    try:
        config = RETConfig.from_dict(card.get("config", ARCHITECTURES[architecture].to_dict()))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid config: {exc}") from exc
    encoder = card["encoder"]
    dim = encoder.get("dim") if isinstance(encoder, dict) else None
    if dim != config.embedding_dim:
        name = encoder.get("name") if isinstance(encoder, dict) else None
        raise CheckpointError(
            f"{path}: encoder {name!r} has embedding dim {dim!r} but the config expects "
            f"embedding_dim {config.embedding_dim}"
        )
    return architecture, config


def load_checkpoint(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load and check a checkpoint directory; the model comes back in eval mode, frozen."""
    directory = Path(directory)
    device = resolve_device(device) if isinstance(device, str) else device
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(
            f"float16 needs a CUDA device (got {device}); use bfloat16 or float32 on CPU"
        )
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    weights_path, card_path = directory / WEIGHTS_FILE, directory / CARD_FILE
    if not card_path.is_file():
        raise CheckpointError(f"checkpoint {directory} is missing {CARD_FILE}")
    card = _read_card(card_path)  # first: a checkpoint of another kind says so
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint {directory} is missing {WEIGHTS_FILE}")
    architecture, config = _config_from_card(card, card_path)
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {weights_path}: {exc}") from exc

    model = model_class(architecture)(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{weights_path} is missing tensor(s): {', '.join(missing)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{weights_path} has unexpected tensor(s): {', '.join(unexpected)}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{weights_path}: tensor {name!r} has shape {tuple(tensor.shape)} where "
                f"{tuple(expected[name].shape)} is expected"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{weights_path}: tensor {name!r} has dtype {tensor.dtype}")
    digest = sha256_file(weights_path)
    if card.get("weights_sha256", digest) != digest:
        raise CheckpointError(
            f"{weights_path} has sha256 {digest} but {card_path.name} names "
            f"{card['weights_sha256']}: the weights are not the ones the card describes"
        )
    tokenizer = load_tokenizer(directory, config)
    model.load_state_dict(tensors)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        architecture=architecture,
        config=config,
        card=card,
        sha256=digest,
        path=directory,
        tokenizer=tokenizer,
    )


def read_tokenizer(directory: Path) -> Tokenizer:
    """A checkpoint's tokenizer.json, or the byte tokenizer when there is none."""
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        return BYTES
    try:
        return Tokenizer.from_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def load_tokenizer(directory: Path, config: RETConfig) -> Tokenizer:
    """`read_tokenizer`, which must have the config's vocab_size."""
    tokenizer = read_tokenizer(directory)
    path = directory / TOKENIZER_FILE
    if tokenizer.vocab_size != config.vocab_size:
        where = path if path.is_file() else f"{directory} (no {TOKENIZER_FILE}: bytes)"
        raise CheckpointError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the config's "
            f"vocab_size is {config.vocab_size}"
        )
    return tokenizer
