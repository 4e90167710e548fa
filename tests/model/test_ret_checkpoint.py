"""Checkpoints: save/load round trip, card contents, and precise errors for broken directories."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from retd.model.checkpoint import (
    CARD_FILE,
    DEFAULT_ENCODER,
    WEIGHTS_FILE,
    CheckpointError,
    LoadedModel,
    init_checkpoint,
    load_checkpoint,
    parse_dtype,
    resolve_device,
    save_checkpoint,
)
from retd.model.model import RET

CARD = {"version": "2.1.0-test", "trained": True, "training": {"steps": 3}, "metrics": {"ppl": 2}}


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return init_checkpoint(tmp_path / "ckpt", seed=0, architecture="ret_tiny")


def test_save_load_round_trip_gives_identical_logits(tmp_path: Path, tiny_model: RET) -> None:
    directory = save_checkpoint(tiny_model, tmp_path / "a", architecture="ret_tiny", card=CARD)
    loaded = load_checkpoint(directory)
    assert isinstance(loaded, LoadedModel)
    assert (loaded.architecture, loaded.config) == ("ret_tiny", tiny_model.config)
    assert loaded.path == directory
    assert loaded.trained and loaded.version == "2.1.0-test"
    emb, tokens = torch.randn(2, 768), torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded.model(emb, tokens), tiny_model(emb, tokens))
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.sha256 == hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()
    again = save_checkpoint(tiny_model, tmp_path / "b", architecture="ret_tiny", card=CARD)
    assert load_checkpoint(again).sha256 == loaded.sha256  # stable across saves


def test_a_repeated_block_checkpoint_stores_each_block_once(tmp_path: Path) -> None:
    """block_repeat travels in the card; the weights file holds each block's tensors once,
    and the loaded model runs them again (a card without the field loads as 1)."""
    from retd.model.model import config_for

    model = RET(config_for("ret_tiny", {"n_layer": 2, "block_repeat": 3}))
    directory = save_checkpoint(model, tmp_path / "r", architecture="ret_tiny", card=CARD)
    card = json.loads((directory / CARD_FILE).read_text())
    assert card["config"]["block_repeat"] == 3
    assert {
        k.split(".")[1] for k in load_file(directory / WEIGHTS_FILE) if k.startswith("blocks.")
    } == {"0", "1"}
    loaded = load_checkpoint(directory)
    assert loaded.config.depth == 6
    emb, tokens = torch.randn(2, 768), torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded.model(emb, tokens), model(emb, tokens))


def test_card_contents(tiny_dir: Path) -> None:
    card = json.loads((tiny_dir / CARD_FILE).read_text())
    assert card["format"] == "retd-checkpoint/1"
    assert card["architecture"] == "ret_tiny"
    assert card["config"]["n_embd"] == 64
    assert card["version"] == "2.1.0-untrained" and card["trained"] is False
    assert card["encoder"] == dict(DEFAULT_ENCODER)
    assert isinstance(card["training"], dict) and isinstance(card["metrics"], dict)
    loaded = load_checkpoint(tiny_dir)
    assert not loaded.trained and loaded.card == card


def test_weights_are_fp32_and_the_tied_head_is_stored_once(tmp_path: Path) -> None:
    directory = init_checkpoint(tmp_path / "v21")
    tensors = load_file(directory / WEIGHTS_FILE)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert sum(t.numel() for t in tensors.values()) == 722_944
    assert "wte.weight" in tensors
    assert load_checkpoint(directory).model.num_parameters() == 722_944


def test_init_checkpoint_is_seeded(tmp_path: Path) -> None:
    digest = [
        load_checkpoint(init_checkpoint(tmp_path / name, seed=seed, architecture="ret_tiny")).sha256
        for name, seed in (("a", 1), ("b", 1), ("c", 2))
    ]
    assert digest[0] == digest[1] != digest[2]


def test_load_in_bfloat16_on_cpu(tiny_dir: Path) -> None:
    loaded = load_checkpoint(tiny_dir, dtype=torch.bfloat16)
    assert loaded.model.wte.weight.dtype == torch.bfloat16
    assert loaded.model(torch.randn(1, 768), torch.zeros(1, 2, dtype=torch.long)).isfinite().all()


def test_float16_on_cpu_is_refused(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="CUDA"):
        load_checkpoint(tiny_dir, device="cpu", dtype=torch.float16)


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, CARD_FILE])
def test_missing_file_is_named(tiny_dir: Path, missing: str) -> None:
    (tiny_dir / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        load_checkpoint(tiny_dir)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def _rewrite_weights(directory: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(directory / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, directory / WEIGHTS_FILE)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tiny_dir: Path) -> None:
    def shrink(t: dict[str, torch.Tensor]) -> None:
        t["blocks.0.mlp.fc.weight"] = torch.zeros(95, 64)

    _rewrite_weights(tiny_dir, shrink)
    pattern = r"blocks\.0\.mlp\.fc\.weight.*\(95, 64\).*\(96, 64\)"
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(tiny_dir)


def test_missing_and_unexpected_tensors_are_named(tiny_dir: Path) -> None:
    _rewrite_weights(tiny_dir, lambda t: t.pop("ln_f.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*ln_f\.bias"):
        load_checkpoint(tiny_dir)
    extra = {"ln_f.bias": torch.zeros(64), "lm_head": torch.zeros(256, 64)}
    _rewrite_weights(tiny_dir, lambda t: t.update(extra))
    with pytest.raises(CheckpointError, match="unexpected tensor.*lm_head"):
        load_checkpoint(tiny_dir)


def test_weights_that_are_not_the_cards_are_refused(tiny_dir: Path) -> None:
    card = json.loads((tiny_dir / CARD_FILE).read_text())
    assert card["weights_sha256"] == load_checkpoint(tiny_dir).sha256
    _rewrite_weights(tiny_dir, lambda t: t["ln_f.bias"].add_(1.0))  # same shapes, other values
    with pytest.raises(CheckpointError, match="not the ones the card describes"):
        load_checkpoint(tiny_dir)


def _edit_card(directory: Path, **changes: object) -> None:
    path = directory / CARD_FILE
    card = json.loads(path.read_text())
    card.update(changes)
    path.write_text(json.dumps(card))


def test_unknown_architecture_lists_the_known_ones(tiny_dir: Path) -> None:
    _edit_card(tiny_dir, architecture="ret_v3")
    with pytest.raises(CheckpointError, match="ret_v3.*ret_tiny, ret_v21"):
        load_checkpoint(tiny_dir)


def test_encoder_dim_must_match_the_config(tiny_dir: Path) -> None:
    _edit_card(tiny_dir, encoder={"name": "small-encoder", "dim": 384})
    with pytest.raises(CheckpointError, match="small-encoder.*384.*768"):
        load_checkpoint(tiny_dir)


def test_corrupt_card_and_weights(tiny_dir: Path) -> None:
    (tiny_dir / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE.replace(".", r"\.")):
        load_checkpoint(tiny_dir)
    (tiny_dir / CARD_FILE).write_text("{")
    with pytest.raises(CheckpointError, match=CARD_FILE.replace(".", r"\.")):
        load_checkpoint(tiny_dir)


def test_save_refuses_unknown_architecture(tmp_path: Path, tiny_model: RET) -> None:
    with pytest.raises(ValueError, match="ret_tiny, ret_v21"):
        save_checkpoint(tiny_model, tmp_path, architecture="nope", card=CARD)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
    ],
)
def test_parse_dtype(name: str, dtype: torch.dtype) -> None:
    assert parse_dtype(name) == dtype


def test_parse_dtype_rejects_others() -> None:
    with pytest.raises(ValueError, match="int8"):
        parse_dtype("int8")


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
