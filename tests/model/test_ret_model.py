"""The RET network: size, shapes, causality, and the KV-cached step against the reference."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from retd.model.model import ARCHITECTURES, RET, KVCache, RETConfig, config_for
from retd.model.shapes import SHAPES, decode_step_ms, setting_table, table, train_kbytes_per_s


def test_ret_v21_has_exactly_722944_parameters() -> None:
    model = RET(config_for("ret_v21"))
    assert model.num_parameters() == 722_944
    assert sum(t.numel() for t in model.state_dict().values()) == 722_944  # head is tied


def test_default_config_is_ret_v21() -> None:
    assert ARCHITECTURES["ret_v21"] == RETConfig()
    assert (RETConfig().n_layer, RETConfig().n_embd, RETConfig().head_dim) == (3, 128, 32)


def test_init_is_nanogpt_like() -> None:
    model = RET(config_for("ret_v21"))
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / (2 * model.config.n_layer) ** 0.5
    for block in model.blocks:
        assert block.mlp.proj.weight.std().item() == pytest.approx(residual, rel=0.05)
        assert block.attn.proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert torch.equal(model.ln_f.weight, torch.ones(128))
    assert torch.equal(model.ln_f.bias, torch.zeros(128))


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone(
    make_model: Callable[..., RET],
) -> None:
    state = torch.random.get_rng_state()
    a, b = make_model(seed=3), make_model(seed=3)
    torch.random.set_rng_state(state)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert not torch.equal(a.wte.weight, make_model(seed=4).wte.weight)


def test_config_dict_round_trip_and_unknown_keys() -> None:
    config = config_for("ret_tiny")
    assert RETConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="bogus"):
        RETConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_embd = 3  # type: ignore[misc]


def test_config_for_overrides_and_unknown_names() -> None:
    assert config_for("ret_v21", {"max_length": 32}).max_length == 32
    with pytest.raises(KeyError, match="ret_v21"):
        config_for("ret_v99")
    with pytest.raises(ValueError, match="n_layers"):
        config_for("ret_v21", {"n_layers": 2})


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divisible"):
        RETConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="eos_id"):
        RETConfig(eos_id=256)


@pytest.mark.parametrize("T", [0, 1, 7])
def test_forward_shapes(tiny_model: RET, T: int) -> None:
    emb = torch.randn(3, 768)
    tokens = torch.randint(0, 256, (3, T))
    assert tiny_model(emb, tokens).shape == (3, T + 1, 256)
    assert tiny_model.condition(emb).shape == (3, 64)


def test_forward_is_causal(tiny_model: RET) -> None:
    emb = torch.randn(2, 768)
    tokens = torch.randint(1, 256, (2, 12))
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 256  # byte 5 is the input at position 6
    a, b = tiny_model(emb, tokens), tiny_model(emb, changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 6], b[:, 6])


def test_forward_depends_on_the_embedding(tiny_model: RET) -> None:
    tokens = torch.randint(1, 256, (1, 4))
    a, b = tiny_model(torch.randn(1, 768), tokens), tiny_model(torch.randn(1, 768), tokens)
    assert not torch.allclose(a[:, 0], b[:, 0])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_kv_cache_shapes() -> None:
    cache = KVCache(config_for("ret_v21"), num_slots=5)
    assert cache.num_slots == 5
    assert cache.k.shape == cache.v.shape == (3, 5, 4, 256, 32)


@torch.no_grad()
def test_step_matches_forward_under_continuous_batching(make_model: Callable[..., RET]) -> None:
    """Rows at different positions in nonconsecutive slots, with stale data in the cache."""
    model = make_model("ret_tiny", seed=2)
    lengths = [9, 4, 12]
    starts = [0, 3, 1]  # step at which each sequence joins the batch
    slots = [5, 0, 2]
    emb = torch.randn(3, 768)
    seqs = [torch.randint(1, 256, (n,)) for n in lengths]
    cache = KVCache(model.config, num_slots=6)
    cache.k.normal_()  # stale garbage must be masked, not attended to
    cache.v.normal_()
    cond = model.condition(emb)
    got: list[list[torch.Tensor]] = [[] for _ in lengths]
    for clock in range(max(s + n for s, n in zip(starts, lengths, strict=True))):
        rows = [i for i in range(3) if starts[i] <= clock < starts[i] + lengths[i]]
        pos = [clock - starts[i] for i in rows]
        prev = torch.tensor([seqs[i][p - 1] if p else 999 for i, p in zip(rows, pos, strict=True)])
        positions = torch.tensor(pos)
        logits = model.step(
            cond[rows], prev, positions, cache, torch.tensor([slots[i] for i in rows])
        )
        for j, i in enumerate(rows):
            got[i].append(logits[j])
    for i, n in enumerate(lengths):
        reference = model(emb[i : i + 1], seqs[i][None, : n - 1])[0]  # (n, V)
        torch.testing.assert_close(torch.stack(got[i]), reference, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_batched_step_equals_each_row_alone(tiny_model: RET) -> None:
    emb = torch.randn(4, 768)
    tokens = torch.randint(1, 256, (4, 10))
    cond = tiny_model.condition(emb)
    batched_cache = KVCache(tiny_model.config, num_slots=4)
    batched = [
        tiny_model.step(
            cond,
            tokens[:, t - 1] if t else tokens[:, 0],
            torch.full((4,), t),
            batched_cache,
            torch.arange(4),
        )
        for t in range(10)
    ]
    for row in range(4):
        cache = KVCache(tiny_model.config, num_slots=1)
        for t in range(10):
            alone = tiny_model.step(
                cond[row : row + 1],
                tokens[row : row + 1, t - 1] if t else tokens[row : row + 1, 0],
                torch.tensor([t]),
                cache,
                torch.tensor([0]),
            )
            torch.testing.assert_close(alone[0], batched[t][row], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_step_at_position_zero_ignores_the_token(tiny_model: RET) -> None:
    cond = tiny_model.condition(torch.randn(2, 768))
    a = tiny_model.step(
        cond,
        torch.tensor([5, 7]),
        torch.zeros(2, dtype=torch.long),
        KVCache(tiny_model.config, 2),
        torch.arange(2),
    )
    b = tiny_model.step(
        cond,
        torch.tensor([-1, 300]),
        torch.zeros(2, dtype=torch.long),
        KVCache(tiny_model.config, 2),
        torch.arange(2),
    )
    assert torch.equal(a, b)


@torch.no_grad()
def test_bfloat16_model_runs_close_to_float32(
    tiny_model: RET, make_model: Callable[..., RET]
) -> None:
    emb = torch.randn(2, 768)
    tokens = torch.randint(1, 256, (2, 6))
    ref = tiny_model(emb, tokens)
    low = make_model("ret_tiny", seed=0).to(torch.bfloat16)(emb, tokens)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.1, atol=0.1)


# The shapes of the shape search (README): each exactly RET v2.1's parameter budget.


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_searched_shape_has_exactly_722944_parameters(name: str) -> None:
    model = RET(config_for("ret_v21", SHAPES[name]))
    assert model.num_parameters() == 722_944
    assert sum(t.numel() for t in model.state_dict().values()) == 722_944


def test_the_shape_table_reads_each_runs_last_evaluation(tmp_path: Path) -> None:
    run = tmp_path / "3x128-add"
    run.mkdir()
    rows = [
        {"step": 200, "loss": 3.0},
        {
            "step": 400,
            "minutes": 4.5,
            "heldout_loss": 2.5,
            "heldout_loss_shuffled": 2.75,
            "heldout_chrf_greedy": 7.25,
            "bytes_per_s": 12345,
        },
        {"step": 500, "loss": 2.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    timings = {64: dict.fromkeys(SHAPES, 3.5), 1: dict.fromkeys(SHAPES, 0.25)}
    speeds = dict.fromkeys(SHAPES, 12.0)
    lines = table(tmp_path, timings, speeds).splitlines()
    early = table(tmp_path, timings, speeds, at_minutes=4.0).splitlines()
    assert "decode ms/step @1 | decode ms/step @64 | train kB/s" in lines[0]
    assert len(lines) == 2 + len(SHAPES)
    (measured,) = [line for line in lines if line.startswith("| 3×128 | add | 512 |")]
    cells = [c.strip() for c in measured.strip("|").split("|")]
    assert cells[3:9] == ["bytes", "1.00", "722,944", "0.25", "3.50", "12.0"]
    assert cells[9:] == ["400", "4.5", "2.500", "2.750", "0.250", "7.25"]
    (bpe,) = [line for line in lines if "| BPE 1024 |" in line]
    assert "| 2.51 | 722,944 |" in bpe
    assert all(line.endswith("| — |") for line in lines[2:] if line is not measured)
    assert all(line.endswith("| — |") for line in early[2:])  # no evaluation by 4 minutes


def test_shapes_are_timed_side_by_side() -> None:
    shapes = {"one": config_for("ret_tiny"), "two": config_for("ret_tiny", {"n_layer": 2})}
    for result in (
        decode_step_ms(shapes, batch=3, steps=2, repeats=1),
        train_kbytes_per_s(shapes, batches=1, repeats=1),
    ):
        assert set(result) == set(shapes) and all(v > 0 for v in result.values())


def test_the_kernel_table_times_each_shape_on_each_attention_kernel() -> None:
    shapes = {"one": config_for("ret_tiny"), "two": config_for("ret_tiny", {"n_layer": 2})}
    lines = setting_table(shapes, "attention", ["default", "auto"], repeats=1).splitlines()
    assert lines[0] == "| shape | train kB/s, default | train kB/s, auto | auto / default |"
    assert len(lines) == 2 + len(shapes)
    for name, line in zip(shapes, lines[2:], strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        default, auto, ratio = (float(c) for c in cells[1:])
        assert cells[0] == name and default > 0 and auto > 0
        assert ratio == pytest.approx(auto / default, abs=0.01)


def test_the_dropout_table_trains_each_shape_at_each_dropout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    set_to: list[float] = []
    real = RET.set_dropout
    monkeypatch.setattr(RET, "set_dropout", lambda self, p: (set_to.append(p), real(self, p)))
    from retd.model.shapes import main

    assert main(["--dropout", "0", "0.25", "--shapes", "1x256-add", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = "| shape | train kB/s, dropout 0.0 | train kB/s, dropout 0.25 |"
    assert lines[0] == head + " dropout 0.25 / dropout 0.0 |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["1x256-add"]
    assert sorted(set_to) == [0.0, 0.25]  # each run's model trained at its own dropout


def test_unknown_conditioning_is_refused() -> None:
    with pytest.raises(ValueError, match="conditioning"):
        RETConfig(conditioning="prefix")


def test_configs_without_conditioning_load_as_add() -> None:
    """Cards written before the field existed hold no `conditioning`: they mean "add"."""
    legacy = {k: v for k, v in config_for("ret_v21_wide").to_dict().items() if k != "conditioning"}
    assert RETConfig.from_dict(legacy).conditioning == "add"


def stepped(model: RET, emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The cached step's logits at every position of each row, one row a slot: what the
    forward pass gives at once, (B, T+1, V)."""
    B, T = tokens.shape
    cache, slots, cond = KVCache(model.config, num_slots=B), torch.arange(B), model.condition(emb)
    got = []
    for t in range(T + 1):
        prev = tokens[:, t - 1] if t else torch.zeros(B, dtype=torch.long)
        got.append(model.step(cond, prev, torch.full((B,), t), cache, slots))
    return torch.stack(got, 1)


@torch.no_grad()
@pytest.mark.parametrize("n_layer", [1, 3])
def test_layer_conditioning_reaches_every_block_and_step_matches_forward(n_layer: int) -> None:
    config = config_for("ret_tiny", {"n_layer": n_layer, "conditioning": "layer"})
    model = RET(config)
    model.init_weights(generator=torch.Generator().manual_seed(3))
    model.eval()
    assert len(model.cond_proj) == n_layer
    emb, tokens = torch.randn(2, 768), torch.randint(1, 256, (2, 7))
    reference = model(emb, tokens)  # (2, 8, V)
    torch.testing.assert_close(stepped(model, emb, tokens), reference, rtol=1e-4, atol=1e-5)
    # the projections are used: zeroing one changes the output
    model.cond_proj[n_layer - 1].weight.zero_()
    assert not torch.allclose(model(emb, tokens), reference)


@torch.no_grad()
@pytest.mark.parametrize("conditioning", ["add", "layer"])
def test_a_repeated_block_runs_its_weights_again_and_step_matches_forward(
    conditioning: str,
) -> None:
    """block_repeat 2: the same parameters (and count) as block_repeat 1, each block run twice
    in a row (block 0, block 0, block 1, block 1), a KV cache layer per run, and the cached
    step gives the forward pass's logits."""
    shape = {"n_layer": 2, "conditioning": conditioning}
    once = RET(config_for("ret_tiny", shape))
    twice = RET(config_for("ret_tiny", {**shape, "block_repeat": 2}))
    twice.load_state_dict(once.state_dict())  # the same tensors: nothing added
    assert twice.num_parameters() == once.num_parameters()
    assert twice.config.depth == 4 and KVCache(twice.config, 3).k.shape[0] == 4
    emb, tokens = torch.randn(2, 768), torch.randint(1, 256, (2, 6))
    cond = twice.condition(emb)[:, None, :]
    x = torch.cat((cond, twice.wte(tokens) + cond), dim=1)
    for i in (0, 0, 1, 1):
        if twice.cond_proj:
            x = x + twice.cond_proj[i](cond)
        x = twice.blocks[i](x)
    reference = twice(emb, tokens)
    torch.testing.assert_close(reference, twice.ln_f(x) @ twice.wte.weight.T)
    assert not torch.allclose(reference, once(emb, tokens))
    torch.testing.assert_close(stepped(twice, emb, tokens), reference, rtol=1e-4, atol=1e-5)


def test_a_block_repeat_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="block_repeat must be a positive int"):
        RETConfig(block_repeat=0)


@torch.no_grad()
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_only_in_training_and_adds_no_parameters(tiny_model: RET, p: float) -> None:
    """set_dropout(p): in eval mode (every decode path) the logits are the undropped ones; in
    train mode they vary with the seed and repeat under the same seed; p 0 in train mode is
    the plain forward. No parameter and no state is added; p outside [0, 1) is refused."""
    emb, tokens = torch.randn(3, 768), torch.randint(1, 256, (3, 10))
    keys, count = set(tiny_model.state_dict()), tiny_model.num_parameters()
    tiny_model.eval()
    reference = tiny_model(emb, tokens)
    tiny_model.set_dropout(p)
    assert set(tiny_model.state_dict()) == keys and tiny_model.num_parameters() == count
    assert torch.equal(tiny_model(emb, tokens), reference)
    tiny_model.train()
    dropped = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        dropped.append(tiny_model(emb, tokens))
    assert not torch.allclose(dropped[0], reference)
    assert not torch.allclose(dropped[0], dropped[1])
    assert torch.equal(dropped[0], dropped[2])
    tiny_model.set_dropout(0.0)
    torch.testing.assert_close(tiny_model(emb, tokens), reference)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
            tiny_model.set_dropout(bad)
