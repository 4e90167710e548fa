"""The encoder carried to a GPU machine in int8 chunks (retd.model.carry): what unpacks is the
encoder again, close enough that its embeddings stay at cosine >= 0.999 to the upstream ones."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import load_file, save_file

from retd.model.carry import dequantize, pack, quantize, unpack, write_chunks, write_corpus
from retd.model.encoder import SentenceEncoder, assemble_encoder, cosine_rows

TEXTS = [
    "The stock market fell sharply on Monday.",
    "I would like a cup of coffee, please.",
    "No way!",
    "Apes, collectively Hominoidea, are a superfamily of Old World simians native to "
    "sub-Saharan Africa and Southeast Asia.",
    "git-rebase - Reapply commits on top of another base tip",
]


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 6), st.sampled_from([1, 12, 32, 64, 96])),
        elements=st.floats(-20, 20, width=32),
    )
)
def test_each_weight_comes_back_within_half_a_step_of_its_group(weight: np.ndarray) -> None:
    q, scale = quantize(weight)
    assert q.dtype == np.int8 and scale.dtype == np.float16
    groups = scale.shape[1]
    assert groups == (weight.shape[1] // 32 if weight.shape[1] % 32 == 0 else 1)
    back = dequantize(q, scale)
    step = np.repeat(scale.astype(np.float32), weight.shape[1] // groups, axis=1)
    assert np.all(np.abs(back - weight) <= step * 0.5 + 1e-6 + np.abs(weight) * 1e-3)


def test_a_model_directory_round_trips_through_chunks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = tmp_path / "model"
    (model / "1_Pooling").mkdir(parents=True)
    tensors = {
        "matrix": rng.standard_normal((8, 64)).astype(np.float32),
        "padding_row": np.zeros((2, 32), np.float32),
        "vector": rng.standard_normal(16).astype(np.float32),
        "ids": np.arange(5, dtype=np.int64),
    }
    save_file(tensors, str(model / "model.safetensors"))
    (model / "config.json").write_text('{"hidden_size": 64}')
    (model / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    chunks = write_chunks(pack(model), tmp_path / "carry", [0.0008, 0.0004])
    sizes = [p.stat().st_size for p in chunks]
    assert len(chunks) > 2 and sizes[0] <= 0.0008 * 2**20 and max(sizes[1:]) <= 0.0004 * 2**20
    assert [p.parent.name for p in chunks] == [f"call{k + 1}" for k in range(len(chunks))]
    out = unpack(list(reversed(chunks)), tmp_path / "out")  # joined in name order
    back = load_file(out / "model.safetensors")
    assert set(back) == set(tensors) and all(v.dtype == tensors[k].dtype for k, v in back.items())
    assert np.array_equal(back["ids"], tensors["ids"])
    assert np.array_equal(back["padding_row"], tensors["padding_row"])
    assert np.abs(back["matrix"] - tensors["matrix"]).max() < np.abs(tensors["matrix"]).max() / 127
    assert np.allclose(back["vector"], tensors["vector"], rtol=1e-3)
    assert (out / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
    assert json.loads((out / "carried.json").read_text())["packed_sha256"]


def test_the_corpus_travels_as_one_archive_beside_the_last_chunk(tmp_path: Path) -> None:
    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "train.txt").write_text("A cat sat on the mat.\nWhere did you put the car keys?\n")
    (corpus / "corpus.json").write_text('{"sources": []}')
    archive = write_corpus(corpus, tmp_path / "carry" / "call3")
    with tarfile.open(archive) as opened:
        opened.extractall(tmp_path / "there", filter="data")
    for name in ("train.txt", "corpus.json"):
        assert (tmp_path / "there" / "corpus" / name).read_bytes() == (corpus / name).read_bytes()


def test_the_carried_encoder_embeds_as_the_upstream_one(
    tmp_path: Path,
) -> None:
    upstream = assemble_encoder()
    chunks = write_chunks(pack(upstream), tmp_path / "carry", [45.0])
    out = unpack(chunks, tmp_path / "encoder")
    carried = SentenceEncoder.load(tmp_path / "encoder")  # RETD_ENCODER_DIR's default
    assert carried.model_dir == out and carried.weights_sha256.startswith("carried:")
    cosine = cosine_rows(carried.encode(TEXTS), SentenceEncoder(upstream).encode(TEXTS))
    assert cosine.min() >= 0.999, cosine
    assert cosine.min() < 1.0  # it did go through int8
    # The one text known to move (bfloat16 moved it too): an embedding so sensitive that
    # float16 vectors alone take it to 0.999; here it stays near 0.95 (README: what that costs).
    odd = cosine_rows(
        carried.encode(["Then isn't it?"]), SentenceEncoder(upstream).encode(["Then isn't it?"])
    )
    assert 0.9 < odd[0] < 0.999


def test_a_tiny_weight_is_not_clipped_by_its_rounded_scale() -> None:
    """0.0001 / 127 in float16 (a subnormal) rounds down: 129 steps would be needed and 127
    kept. The scale is rounded up instead (found by the property test above)."""
    weight = np.array([[1e-4]], np.float32)
    q, scale = quantize(weight)
    assert abs(dequantize(q, scale)[0, 0] - 1e-4) <= float(scale[0, 0]) * 0.5 + 1e-9
