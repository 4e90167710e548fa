"""`retd build-phrase-bank` end to end on a tiny file, with the real sentence encoder: the
bank it writes holds the file's phrases, embedded as `retd embed` embedded the fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from retd.client.cli import main
from retd.model.embed import load_split
from retd.model.encoder import cosine_rows, sha256_file
from retd.model.phrase_bank import load_phrase_bank, read_phrases

FIXTURE = Path(__file__).parents[1] / "data" / "embedded"
TEXTS = (FIXTURE / "corpus" / "heldout.txt").read_text().splitlines()[:10]
STORED = np.load(FIXTURE / "embeddings" / "heldout" / "shard-00000.npy")[:10].astype(np.float32)


def test_read_phrases_skips_blank_lines_and_repeats(tmp_path: Path) -> None:
    path = tmp_path / "phrases.txt"
    path.write_text("one\n\n  \ntwo words\none\n three \r\n", encoding="utf-8")
    assert read_phrases(path) == (["one", "two words", " three "], 1)


def test_build_phrase_bank_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = tmp_path / "phrases.txt"
    texts.write_text("\n".join([*TEXTS[:5], "", TEXTS[0], *TEXTS[5:]]) + "\n", encoding="utf-8")
    out = tmp_path / "tiny_bank"
    status = main(
        ["build-phrase-bank", "--texts", str(texts), "--out", str(out), "--dtype", "float32"]
    )
    assert status == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["phrases"] == 10 and summary["repeats_dropped"] == 1
    assert "embed phrases" in captured.err and "10/10" in captured.err  # the progress bar

    loaded = load_phrase_bank(out)
    assert loaded.bank.phrases == TEXTS
    assert loaded.card["name"] == "tiny_bank" and loaded.card["dtype"] == "float32"
    assert loaded.card["source"] == {
        "texts": "phrases.txt",
        "texts_sha256": sha256_file(texts),
        "repeats_dropped": 1,
    }
    fresh = loaded.bank.embeddings.numpy()
    assert (cosine_rows(fresh, STORED) > 0.999).all()  # the encoder that embedded the corpus
    _, rows = loaded.bank.search(torch.from_numpy(STORED), k=1)
    assert rows[:, 0].tolist() == list(range(10))


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read"), ("\n \n", "holds no phrase")],
)
def test_build_phrase_bank_refuses_an_unusable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    texts = tmp_path / "phrases.txt"
    if content is not None:
        texts.write_text(content)
    assert main(["build-phrase-bank", "--texts", str(texts), "--out", str(tmp_path / "b")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_bank_of_the_embedded_training_split_reuses_its_embeddings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = FIXTURE
    out = tmp_path / "train_bank"
    assert main(["build-phrase-bank", "--from-split", str(data), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "embed phrases" not in captured.err  # nothing encoded again
    train = load_split(data, "train")
    assert json.loads(captured.out)["phrases"] == len(train.texts) == 192
    loaded = load_phrase_bank(out)
    assert loaded.bank.phrases == train.texts
    assert loaded.card["source"] == {"data_dir": str(data), "split": "train", "texts": 192}
    stored = train.embeddings.astype(np.float32)
    assert (cosine_rows(loaded.bank.embeddings.float().numpy(), stored) > 0.999).all()
    _, rows = loaded.bank.search(torch.from_numpy(stored), k=1)
    assert rows[:, 0].tolist() == list(range(192))  # each text answers its own embedding
    # a split that was never embedded (or a directory without a corpus) is refused by name
    for split, where in (("ood", data), ("train", tmp_path)):
        args = ["build-phrase-bank", "--from-split", str(where), "--split", split]
        assert main([*args, "--out", str(tmp_path / "none")]) == 2
        assert f"the {split} split has no embedded texts" in capsys.readouterr().err
        assert not (tmp_path / "none").exists()
