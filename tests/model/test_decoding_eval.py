"""`python -m retd.model.decoding_eval`'s decoders: their specs, the loop detector,
guidance (`cfg=W`) as a second pass a step, and minimum Bayes risk over samples (`mbr=N`),
picked by consensus or by the encoder (`by=cos`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from retd.model.decoding_eval import (
    Decoder,
    consensus_scores,
    cosine_pick,
    decode_all,
    guided_step,
    loops,
    mbr_pick,
)
from retd.model.generation import generate
from tests.model.conftest import seeded_model


def test_specs_parse_into_their_fields() -> None:
    decoder = Decoder.parse("rp=1.5,rpn=2,eos=-3,cfg=0.25,max=40")
    assert (decoder.repetition_penalty, decoder.repetition_ngram_size) == (1.5, 2)
    assert (decoder.eos_bias, decoder.guidance, decoder.max_new_tokens) == (-3.0, 0.25, 40)
    assert (Decoder.parse("mbr=8,t=0.9").mbr, Decoder.parse("mbr=8,t=0.9").temperature) == (8, 0.9)
    assert Decoder.parse("greedy") == Decoder("greedy")
    with pytest.raises(ValueError, match="expected key=value"):
        Decoder.parse("guidance=1")
    assert Decoder.parse("mbr=4,by=cos").by == "cos" and Decoder.parse("mbr=4").by == "chrf"
    with pytest.raises(ValueError, match="by= must be chrf or cos"):
        Decoder.parse("mbr=4,by=bleu")


@given(st.text(alphabet="abc ", max_size=12), st.integers(3, 5))
def test_a_stretch_said_three_times_in_a_row_loops(stretch: str, times: int) -> None:
    if len(stretch) >= 3:
        assert loops("x" + stretch * times)
    assert not loops("The cat sat on the mat.")


def test_guidance_zero_is_the_plain_decoder_and_guidance_changes_outputs() -> None:
    model = seeded_model("ret_tiny", seed=3)
    embeddings = torch.randn(12, model.config.embedding_dim)
    plain = decode_all(model, embeddings, Decoder.parse("max=24"))
    params = [Decoder.parse("max=24").params(model.config.max_length)] * len(embeddings)
    unguided = generate(model, embeddings, params, step=guided_step(model, len(embeddings), 0.0))
    assert [r.text for r in unguided] == plain[0]  # the guided step's own pass is the model's
    guided = decode_all(model, embeddings, Decoder.parse("max=24,cfg=2"))
    assert guided[0] != plain[0]  # the second pass moves the argmax of some rows
    batched = decode_all(model, embeddings, Decoder.parse("max=24,cfg=2"), batch_size=5)
    assert batched == guided  # each row's guidance is its own, whatever the batch


@given(st.lists(st.text(alphabet="abcde ", min_size=1, max_size=20), min_size=1, max_size=6))
def test_the_mbr_pick_is_one_of_the_pool_and_a_majority_wins(pool: list[str]) -> None:
    assert mbr_pick(pool) in pool
    # a text said by most of the pool (sharing no letter with the rest) is its consensus
    majority = "quiz glyph rhythm"
    assert mbr_pick([majority] * (len(pool) + 1) + pool) == majority


@given(st.lists(st.text(alphabet="abAB .,é\t", max_size=24), min_size=0, max_size=6))
def test_the_consensus_is_each_texts_mean_sentence_chrf_against_the_others(
    pool: list[str],
) -> None:
    # consensus_scores reuses each text's n-grams; sacrebleu's sentence_score is the reference
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    expected = [
        np.mean([chrf.sentence_score(a, [b]).score for j, b in enumerate(pool) if j != i])
        if len(pool) > 1
        else 0.0  # a pool of one agrees with nothing
        for i, a in enumerate(pool)
    ]
    assert consensus_scores(pool).tolist() == expected


def test_the_mbr_pick_is_the_consensus_not_the_outlier() -> None:
    pool = ["The cat sat on the mat.", "The cat sat on a mat.", "Quick zebras jump.", "A cat sat."]
    assert mbr_pick(pool) in pool[:2]


def test_an_mbr_decoder_picks_from_its_pool_whatever_the_batch() -> None:
    model = seeded_model("ret_tiny", seed=3)
    embeddings = torch.randn(7, model.config.embedding_dim)
    plain = decode_all(model, embeddings, Decoder.parse("max=16"))
    mbr = Decoder.parse("max=16,mbr=3,t=1.5")
    picked = decode_all(model, embeddings, mbr)
    assert decode_all(model, embeddings, mbr, batch_size=3) == picked  # seeds are per row
    params = mbr.params(model.config.max_length)
    samples = [
        generate(model, embeddings, [mbr.sample_params(16, i * 1009 + k) for i in range(7)])
        for k in range(3)
    ]
    for i, text in enumerate(picked[0]):
        pool = [plain[0][i]] + [s[i].text for s in samples]
        assert text == mbr_pick(pool)
        assert picked[2][i] == len(text.encode("utf-8"))
    assert params.temperature == 0.0  # the decoder's own output stays deterministic
    assert any(len({s[i].text for s in samples}) > 1 for i in range(7))  # the pools vary


def letters(texts: list[str], dim: int = 26) -> np.ndarray:
    """A stand-in encoder for the pick's logic: each text's counts of the letters a-z (and
    zeros to `dim`)."""
    counts = [[t.count(chr(97 + i)) for i in range(26)] + [0] * (dim - 26) for t in texts]
    return np.array(counts, dtype=np.float32)


pools_of_texts = st.lists(
    st.lists(st.text(alphabet="abcxyz", min_size=1, max_size=9), min_size=1, max_size=5),
    min_size=1,
    max_size=4,
)


@given(pools_of_texts)
def test_the_cosine_pick_is_the_pool_text_nearest_its_row(pools: list[list[str]]) -> None:
    targets = torch.from_numpy(letters([pool[-1] for pool in pools]) + 0.01)  # near each last
    chosen = cosine_pick(pools, targets, letters)
    for pool, text, target in zip(pools, chosen, targets, strict=True):
        encoded = torch.from_numpy(letters(pool))
        cosines = torch.nn.functional.cosine_similarity(encoded, target[None])
        assert text in pool and cosines[pool.index(text)] >= cosines.max() - 1e-6


def test_a_by_cos_decoder_picks_from_its_pool_with_the_encoder_given() -> None:
    model = seeded_model("ret_tiny", seed=3)
    dim = model.config.embedding_dim
    embeddings = torch.randn(6, dim).abs()  # cosine to letter counts varies from row to row
    decoder = Decoder.parse("max=16,mbr=3,t=1.5,by=cos")
    with pytest.raises(ValueError, match="pass encode="):
        decode_all(model, embeddings, decoder)
    encode = lambda texts: letters(texts, dim)  # noqa: E731
    picked = decode_all(model, embeddings, decoder, encode=encode)[0]
    plain = decode_all(model, embeddings, Decoder.parse("max=16"))[0]
    samples = [
        generate(model, embeddings, [decoder.sample_params(16, i * 1009 + k) for i in range(6)])
        for k in range(3)
    ]
    pools = [[plain[i]] + [s[i].text for s in samples] for i in range(6)]
    assert picked == cosine_pick(pools, embeddings, encode)
    by_chrf = decode_all(model, embeddings, Decoder.parse("max=16,mbr=3,t=1.5"))[0]
    assert picked != by_chrf  # the two picks differ somewhere
