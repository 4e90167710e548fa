"""Fixtures for the batching tests: a real checkpoint whose greedy output depends on the
prefix, so a row mixed up with another, or a wrong position or KV slot, changes the bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retd.model.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from retd.model.model import RET, config_for


def write_sharp_checkpoint(directory: Path, architecture: str = "ret_v21") -> Path:
    """A seeded ret checkpoint with stronger byte embeddings and attention, and a signed final
    norm: the untrained init repeats one byte forever, this one does not always."""
    model = RET(config_for(architecture))
    model.init_weights(generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.wte.weight.mul_(50)
        model.ln_f.weight.copy_(torch.randn(model.ln_f.weight.shape, generator=generator))
        for block in model.blocks:
            block.attn.qkv.weight.mul_(10)
    card = {"version": "test-sharp", "trained": False}
    return save_checkpoint(model, directory, architecture=architecture, card=card)


@pytest.fixture(scope="session")
def sharp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sharp_checkpoint(tmp_path_factory.mktemp("sharp") / "ret_v21")


@pytest.fixture(scope="session")
def sharp_model(sharp_checkpoint: Path) -> LoadedModel:
    return load_checkpoint(sharp_checkpoint)
