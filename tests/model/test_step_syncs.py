"""A decode step reads nothing back from the device when the caller knows length and span.

On the meta device tensors have shapes but no values, so every read of a value into Python
(.item(), int(), bool(), .tolist()) and every data-dependent shape raises: what would be a
device->host sync on CUDA fails here, on any machine."""

from __future__ import annotations

import pytest
import torch

from retd.model.model import RET, KVCache, RETConfig, config_for

CONFIGS = [
    config_for("ret_tiny"),
    config_for("ret_v21"),
    config_for("ret_v21_wide"),
    RETConfig(n_embd=48, n_head=3, n_layer=2, mlp_hidden=64, conditioning="layer"),
]


def meta_step(config: RETConfig, **known: int) -> torch.Tensor:
    """One step of 3 rows in slots of a 6-slot cache, all on the meta device."""
    with torch.device("meta"):
        model = RET(config).eval()
        cache = KVCache(config, num_slots=6, device="meta")
        cond = torch.empty(3, config.n_embd)
        tokens, positions, slots = (torch.empty(3, dtype=torch.long) for _ in range(3))
    with torch.no_grad():
        return model.step(cond, tokens, positions, cache, slots, **known)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.n_layer}x{c.n_embd}")
def test_a_step_given_length_and_span_reads_nothing_from_the_device(config: RETConfig) -> None:
    logits = meta_step(config, length=9, span=6)
    assert logits.shape == (3, config.vocab_size) and logits.device.type == "meta"


@pytest.mark.parametrize("missing", ["length", "span"])
def test_a_step_that_must_find_length_or_span_reads_the_device(missing: str) -> None:
    """The check above can fail: without one of them the step reads a max off the device."""
    known = {"length": 9, "span": 6}
    del known[missing]
    with pytest.raises(RuntimeError, match="meta"):
        meta_step(config_for("ret_tiny"), **known)
