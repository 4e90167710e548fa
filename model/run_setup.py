"""How a training run starts: its settings (a TOML file over the one it names as its base),
its tokenizer and model shape (from the config, or from the checkpoint a warm start begins
from) and the warm start itself (`retd.model.train`)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retd.model.checkpoint import read_tokenizer
from retd.model.model import RET, RETConfig, config_for
from retd.model.tokenizer import BYTES, Tokenizer

if TYPE_CHECKING:
    from retd.model.train import TrainConfig


def warm_start(model: RET, config: TrainConfig) -> dict[str, Any]:
    """Load `config.init_from`'s weights into `model`; what the new card says about them."""
    from retd.model.checkpoint import load_checkpoint

    loaded = load_checkpoint(Path(config.init_from))
    if loaded.architecture != config.architecture:
        raise ValueError(
            f"init_from: {config.init_from} holds a {loaded.architecture!r} model; this run "
            f"trains {config.architecture!r}"
        )
    model.load_state_dict(loaded.model.state_dict())
    return {
        "path": str(config.init_from),
        "weights_sha256": loaded.sha256,
        "training": loaded.card.get("training", {}),
    }


def _init_shape(config: TrainConfig) -> dict[str, Any]:
    """The RETConfig fields of the init_from checkpoint's card ({} without a warm start)."""
    if not config.init_from:
        return {}
    card = json.loads((Path(config.init_from) / "card.json").read_text(encoding="utf-8"))
    return dict(card.get("config", {}))


def resolve_tokenizer(config: TrainConfig) -> Tokenizer:
    """The run's tokenizer: config.tokenizer's file, else init_from's, else bytes (whether it
    fits the model is `model_config_for`'s check)."""
    if config.tokenizer:
        return Tokenizer.from_json(Path(config.tokenizer).read_text(encoding="utf-8"))
    if config.init_from:
        return read_tokenizer(Path(config.init_from))
    return BYTES


def model_config_for(config: TrainConfig, tokenizer: Tokenizer) -> RETConfig:
    """The architecture's config with config.model's changes (a warm start: the init_from
    checkpoint's shape, then config.model's); vocab_size is the tokenizer's."""
    shape = {**_init_shape(config), **config.model}
    if shape.setdefault("vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size {shape['vocab_size']} but the tokenizer has "
            f"{tokenizer.vocab_size} tokens"
        )
    return config_for(config.architecture, shape)


def toml_over_base(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML file's settings over those of the file its `base` names (a path relative to it;
    that file may name a base too): each key replaces the base's whole, a [model] table too."""
    if path.resolve() in seen:
        raise ValueError(f"`base` files name each other: {' -> '.join(map(str, seen))} -> {path}")
    with path.open("rb") as f:
        values = tomllib.load(f)
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ValueError(f"base in {path} must be a path (a string), got {base!r}")
    return {**toml_over_base(path.parent / base, (*seen, path.resolve())), **values}
