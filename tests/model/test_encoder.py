"""The real sentence encoder (installed by `make test`/`make encoder`), and `retd embed`."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from retd.model.embed import embed_corpus, load_split, shard_path
from retd.model.encoder import (
    ENCODER_DIM,
    EncoderError,
    SentenceEncoder,
    assemble_encoder,
    auto_precision,
    cosine_rows,
)

FIXTURE = Path(__file__).parents[1] / "data" / "embedded"


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder.load()


def test_paraphrases_embed_closer_than_unrelated_sentences(encoder: SentenceEncoder) -> None:
    vectors = encoder.encode(
        [
            "A cat sat on the mat.",
            "A kitten was sitting on the rug.",
            "The central bank raised interest rates again.",
        ]
    )
    assert vectors.shape == (3, ENCODER_DIM)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    paraphrase, unrelated = (
        cosine_rows(vectors[:1], vectors[1:2]),
        cosine_rows(vectors[:1], vectors[2:]),
    )
    assert paraphrase[0] > unrelated[0] + 0.3


def test_the_corpus_embeddings_are_this_encoders(encoder: SentenceEncoder) -> None:
    """The fixture's stored float16 embeddings (from `retd embed`) are what the encoder gives now,
    batch order and padding notwithstanding."""
    texts = (FIXTURE / "corpus/heldout.txt").read_text().splitlines()
    stored = np.load(FIXTURE / "embeddings/heldout/shard-00000.npy").astype(np.float32)
    fresh = encoder.encode(texts[::-1])[::-1]
    assert (cosine_rows(fresh, stored) > 0.999).all()


def test_the_fast_path_keeps_the_float32_embeddings(encoder: SentenceEncoder) -> None:
    """`retd embed`'s fast path (bfloat16 weights, compiled where bfloat16 is native) stays
    within cosine 0.999 of the float32 reference on texts of every length, order and padding
    notwithstanding."""
    # bfloat16 alone gave this short one cosine 0.961-0.987; the short batches run in float32
    texts = (FIXTURE / "corpus/heldout.txt").read_text().splitlines() + ["Then isn't it?"]
    fast = SentenceEncoder.load(precision="fast")
    assert fast.precision == "fast"
    vectors = fast.encode(texts, batch_size=7)
    assert vectors.dtype == np.float32 and vectors.shape == (len(texts), ENCODER_DIM)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert (cosine_rows(vectors, encoder.encode(texts)) > 0.999).all()


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision: expected one of float32, fast"):
        SentenceEncoder.load(precision="int4")


def test_embedding_resumes_at_the_missing_shards(encoder: SentenceEncoder, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = (FIXTURE / "corpus/heldout.txt").read_text().splitlines()[:10]
    (corpus / "train.txt").write_text("".join(t + "\n" for t in texts))
    calls: list[int] = []

    def encode(chunk: object) -> np.ndarray:
        calls.append(len(chunk))  # type: ignore[arg-type]
        return encoder.encode(chunk)  # type: ignore[arg-type]

    assert embed_corpus(tmp_path, encode, splits=("train",), shard_size=4, progress=False) == {
        "train": 3
    }
    first = load_split(tmp_path, "train")
    assert first.texts == texts and first.embeddings.dtype == np.float16
    shard_path(tmp_path, "train", 1).unlink()
    partial = load_split(tmp_path, "train")
    assert partial.texts == texts[:4] + texts[8:]  # complete shards only, in line order
    calls.clear()
    embed_corpus(tmp_path, encode, splits=("train",), shard_size=4, progress=False)
    assert calls == [4]  # only the missing shard was embedded again
    np.testing.assert_array_equal(load_split(tmp_path, "train").embeddings, first.embeddings)


def test_assembly_refuses_weights_with_the_wrong_hash(tmp_path: Path) -> None:
    archive = tmp_path / "parts.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("all-mpnet-base-v2/model.safetensors", b"not the real weights")
        z.writestr("all-mpnet-base-v2/desktop.ini", b"junk")
    data = archive.read_bytes()
    parts = [tmp_path / "p1", tmp_path / "p2"]
    parts[0].write_bytes(data[:100])
    parts[1].write_bytes(data[100:])
    with pytest.raises(EncoderError, match="sha256"):
        assemble_encoder(tmp_path / "out", parts)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "device", "expected"),
    [
        ("fpu sse2 avx2 avx512f avx512_bf16", "cpu", "fast"),
        ("fpu sse2 avx2 amx_bf16 amx_tile", "cpu", "fast"),
        ("fpu sse2 avx2 avx512f avx512bw", "cpu", "float32"),  # AVX512 without bfloat16
        ("fpu sse2 avx2 fma", "cpu", "float32"),
        ("fpu sse2 avx2 fma", "cuda", "fast"),
    ],
)
def test_auto_precision_runs_fast_only_where_bfloat16_is_native(
    tmp_path: Path, flags: str, device: str, expected: str
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    )
    assert auto_precision(device, cpuinfo) == expected
    assert auto_precision("cpu", tmp_path / "missing") == "float32"


def test_the_encoder_resolves_auto_to_this_machines_choice() -> None:
    assert SentenceEncoder.load(precision="auto").precision == auto_precision()
