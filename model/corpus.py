"""The training corpus: WordNet 3.0 glosses and examples plus the `fortunes` collections.

Sources are Debian packages (`apt-get install -y --no-install-recommends wordnet-base fortunes
fortunes-min`), installed unpinned; what pins the data is the sha256 of the cleaned corpus,
recorded in `corpus.json` and in every checkpoint card trained on it.

Cleaning: whitespace normalised, 10-200 characters, at least 3 words, mostly letters,
de-duplicated. The held-out split is chosen by a hash of the text, so it never changes with
the order of the sources and training never sees it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
SOURCES = {
    "wordnet": "WordNet 3.0 glosses and examples (Debian wordnet-base; WordNet 3.0 licence)",
    "fortunes": "fortune cookies (Debian fortunes and fortunes-min; BSD-style, public domain)",
}
MIN_CHARS, MAX_CHARS, MIN_WORDS, MIN_LETTER_SHARE = 10, 200, 3, 0.6
HELDOUT_PER_MILLE = 20  # 2% of the texts, by hash


@dataclass(frozen=True)
class CorpusSummary:
    directory: Path
    train: int
    heldout: int
    sha256: str  # of train.txt + heldout.txt as written
    per_source: dict[str, int]

    def to_dict(self) -> dict[str, object]:
        return {
            "train": self.train,
            "heldout": self.heldout,
            "sha256": self.sha256,
            "per_source": self.per_source,
            "sources": {name: SOURCES[name] for name in self.per_source},
            "cleaning": {
                "chars": [MIN_CHARS, MAX_CHARS],
                "min_words": MIN_WORDS,
                "min_letter_share": MIN_LETTER_SHARE,
                "heldout_per_mille": HELDOUT_PER_MILLE,
            },
        }


def wordnet_texts(directory: Path = WORDNET_DIR) -> Iterator[str]:
    """Definitions and quoted example sentences from the data.* files."""
    for part in ("noun", "verb", "adj", "adv"):
        with (directory / f"data.{part}").open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # the licence header
                gloss = line.split("|", 1)[1].strip()
                for piece in gloss.split(";"):
                    piece = piece.strip()
                    if piece.startswith('"'):
                        yield piece.strip('"').strip()
                    elif piece:
                        yield piece[0].upper() + piece[1:] + "."


def fortune_texts(directory: Path = FORTUNES_DIR) -> Iterator[str]:
    """Each fortune of every collection (files between `%` lines), skipping the .dat indexes."""
    for path in sorted(directory.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        yield from (chunk for chunk in re.split(r"^%$", text, flags=re.MULTILINE) if chunk.strip())


def clean(text: str) -> str | None:
    """The text with whitespace normalised, or None when it fails a cleaning rule."""
    text = " ".join(text.split())
    if not MIN_CHARS <= len(text) <= MAX_CHARS or len(text.split()) < MIN_WORDS:
        return None
    if "\ufffd" in text or sum(c.isalpha() for c in text) < MIN_LETTER_SHARE * len(text):
        return None
    return text


def is_heldout(text: str) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELDOUT_PER_MILLE


def build_corpus(
    out_dir: Path,
    sources: dict[str, Iterable[str]] | None = None,
) -> CorpusSummary:
    """Write train.txt, heldout.txt (one text per line) and corpus.json into out_dir."""
    if sources is None:
        sources = {"wordnet": wordnet_texts(), "fortunes": fortune_texts()}
    seen: set[str] = set()
    train: list[str] = []
    heldout: list[str] = []
    per_source: dict[str, int] = {}
    for name, texts in sources.items():
        kept = 0
        for raw in texts:
            text = clean(raw)
            if text is None or text in seen:
                continue
            seen.add(text)
            kept += 1
            (heldout if is_heldout(text) else train).append(text)
        per_source[name] = kept
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for name, texts in (("train", train), ("heldout", heldout)):
        data = "".join(t + "\n" for t in texts).encode("utf-8")
        digest.update(data)
        (out_dir / f"{name}.txt").write_bytes(data)
    summary = CorpusSummary(out_dir, len(train), len(heldout), digest.hexdigest(), per_source)
    (out_dir / "corpus.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def read_texts(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()
