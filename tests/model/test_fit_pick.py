"""`python -m retd.model.fit_pick`: pools of training texts the editor never saw, each searched
without itself, then a fitted pick and its cross-validation, resumable."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retd.model.checkpoint import init_checkpoint
from retd.model.embed import SHARD_SIZE, shard_order
from retd.model.fit_pick import chosen_lines, editor_seen, main
from retd.model.pick import FEATURES

FIXTURE = Path(__file__).parents[1] / "data" / "embedded"


def corpus(folder: Path, counts: dict[str, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sources = {name: {"train": n, "heldout": 0} for name, n in counts.items()}
    (folder / "corpus.json").write_text(json.dumps({"sources": sources}))
    return folder


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3 * SHARD_SIZE), st.integers(0, 3), st.integers(0, 500), st.integers(0, 9))
def test_no_pool_is_of_a_text_the_editor_trained_on(
    n: int, shards: int, queries: int, seed: int
) -> None:
    seen = editor_seen(n, shards, [(5, queries)])
    first = shard_order((n + SHARD_SIZE - 1) // SHARD_SIZE)[:shards]
    expect = np.zeros(n, dtype=bool)
    for k in first:
        expect[k * SHARD_SIZE : (k + 1) * SHARD_SIZE] = True
    expect[np.random.default_rng(5).permutation(n)[:queries]] = True
    assert np.array_equal(seen, expect)
    split = n // 3
    with tempfile.TemporaryDirectory() as tmp:
        folder = corpus(Path(tmp), {"a": split, "b": 0, "c": n - split})
        chosen = chosen_lines(folder, seen, 4, seed)
        assert chosen == chosen_lines(folder, seen, 4, seed)  # the seed fixes the draw
    lines = [line for line, _ in chosen]
    assert not seen[lines].any() and len(set(lines)) == len(lines)
    for name, lo, hi in [("a", 0, split), ("c", split, n)]:
        mine = [line for line, source in chosen if source == name]
        assert all(lo <= line < hi for line in mine)
        assert len(mine) == min(4, int((~seen[lo:hi]).sum()))


def test_pools_then_a_fit_resumed_without_rebuilding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)
    texts = (data / "corpus" / "train.txt").read_text(encoding="utf-8").splitlines()
    corpus(data / "corpus", {"first": 100, "rest": len(texts) - 100})
    init = init_checkpoint(tmp_path / "init", architecture="ret_tiny")
    pools, out = tmp_path / "pools.jsonl", tmp_path / "pick.json"
    argv = [str(init), "--pools", str(pools), "--out", str(out), "--data-dir", str(data),
            "--per-source", "3", "--exclude-shards", "0", "--exclude-queries", "5:40",
            "--k", "2", "--decoder", "max=8", "--max-prefix", "8", "--steps", "5",
            "--encoder-precision", "float32", "--threads", "1"]  # fmt: skip
    assert main([*argv, "--max-pools", "2"]) == 0  # the first two drawn only
    assert json.loads(out.read_text(encoding="utf-8"))["pools"] == 2
    assert pools.read_text(encoding="utf-8").count("\n") == 2
    assert main(argv) == 0  # the other four
    built = [json.loads(line) for line in pools.read_text(encoding="utf-8").splitlines()]
    assert sorted(b["source"] for b in built) == ["first"] * 3 + ["rest"] * 3
    seen = editor_seen(len(texts), 0, [(5, 40)])
    for pool in built:
        assert not seen[pool["line"]] and pool["ref"] == texts[pool["line"]]
        assert len(pool["edits"]) == len(pool["neighbours"]) == 2 and len(pool["cosine"]) == 4
        assert pool["ref"] not in pool["neighbours"]  # its own row is never its neighbour
    result = json.loads(out.read_text(encoding="utf-8"))
    assert set(result["weights"]) == set(FEATURES) and result["pools"] == 6
    assert set(result["cross_validated"]) == {"learnt_chrf", "rule_chrf"}
    capsys.readouterr()
    assert main(argv) == 0  # resumed: every pool is there, none is built again
    assert "6 pools there, 0 to build" in capsys.readouterr().out
    assert pools.read_text(encoding="utf-8").count("\n") == 6
