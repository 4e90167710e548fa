"""Manuals whose markup is not HTML: man pages (roff), Perl's POD, and the King James Bible
as the bible-kjv package's `bible` prints it. See `retd.model.sources`."""

from __future__ import annotations

import gzip
import re
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

from retd.model.sources import sentences_of

DPKG_INFO_DIR = Path("/var/lib/dpkg/info")
PERL_POD_DIR = Path("/usr/share/perl/5.36/pod")


# ----------------------------------------------------------------------------- man pages

_ROFF_ESCAPES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes \fB \f(CW \f[R]
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # strings \*(lq
    (re.compile(r"\\\((em|en)"), " - "),
    (re.compile(r"\\\((aq|cq|oq)"), "'"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((bu|co|rg|tm|de|mu|\.\.)"), ""),
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\e"), r"\\"),
    (re.compile(r"\\[&|^%:]"), ""),
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\c$"), ""),
]
_FONT_MACROS = {"B", "I", "SM", "SB"}
_ALTERNATING_MACROS = {"BR", "RB", "BI", "IB", "IR", "RI"}
_SKIPPED_SECTIONS = {"NAME", "SYNOPSIS", "SEE ALSO", "COLOPHON", "AUTHORS", "AUTHOR"}


def _roff_inline(text: str) -> str:
    for pattern, replacement in _ROFF_ESCAPES:
        text = pattern.sub(replacement, text)
    return text


def _macro_arguments(rest: str) -> list[str]:
    return [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', rest)]


def roff_paragraphs(source: str) -> list[str]:
    """The prose paragraphs of a man page written in roff (man macros): comments, headers,
    NAME/SYNOPSIS/SEE ALSO sections, no-fill blocks (.nf/.EX: code) and tables dropped,
    font macros and escapes turned into plain text."""
    paragraphs: list[str] = []
    current: list[str] = []
    skipping_block = skipping_section = False

    def flush() -> None:
        text = " ".join(" ".join(current).split())
        if text:
            paragraphs.append(text)
        current.clear()

    for line in source.replace("\\\n", "").splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\"')) or line.startswith('\\"'):
            continue
        if line.startswith((".", "'")):
            name, _, rest = line[1:].strip().partition(" ")
            if name in ("nf", "EX", "TS", "EQ"):
                flush()
                skipping_block = True
            elif name in ("fi", "EE", "TE", "EN"):
                skipping_block = False
            elif name in ("SH", "SS"):
                flush()
                title = " ".join(_macro_arguments(rest)).upper()
                skipping_section = name == "SH" and title in _SKIPPED_SECTIONS
            elif skipping_block or skipping_section:
                continue
            elif name in _FONT_MACROS:
                current.append(" ".join(_macro_arguments(_roff_inline(rest))))
            elif name in _ALTERNATING_MACROS:
                current.append("".join(_macro_arguments(_roff_inline(rest))))
            else:  # .PP .TP .IP .RS .br .sp .TH ...: a paragraph break
                flush()
            continue
        if not (skipping_block or skipping_section):
            current.append(_roff_inline(line))
    flush()
    return paragraphs


def package_files(package: str, info_dir: Path = DPKG_INFO_DIR) -> list[Path]:
    """The files a Debian package installed (per dpkg's list), sorted."""
    listing = (info_dir / f"{package}.list").read_text(encoding="utf-8").splitlines()
    return sorted(Path(p) for p in listing if Path(p).is_file() and not Path(p).is_symlink())


def man_page_texts(paths: Iterable[Path] | None = None) -> Iterator[str]:
    """Sentences of the man pages of Debian's manpages and manpages-dev (gzipped roff);
    `.so` redirections skipped."""
    if paths is None:
        paths = [
            p
            for package in ("manpages", "manpages-dev")
            for p in package_files(package)
            if "/man/man" in str(p) and p.suffix == ".gz"
        ]
    for path in paths:
        source = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        if source.lstrip().startswith(".so "):
            continue
        yield from sentences_of(roff_paragraphs(source))


_POD_CODES = re.compile(r"[A-Z]<<+\s(.*?)\s>>+|[A-Z]<([^<>]*)>")


def pod_paragraphs(source: str) -> list[str]:
    """The prose paragraphs of a Perl POD document: commands (=head1, =item ...) and verbatim
    (indented: code) paragraphs dropped, formatting codes (B<..>, C<..>, L<..|..>) unwrapped
    (their link targets and index entries X<..> dropped)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", source):
        if not block.strip() or block[0] in " \t=":
            continue
        text = block
        for _ in range(3):  # nested codes, innermost first
            text = _POD_CODES.sub(
                lambda m: _pod_code(m.group(0)[0], m.group(1) or m.group(2)), text
            )
        paragraphs.append(" ".join(text.split()))
    return paragraphs


def _pod_code(code: str, inner: str) -> str:
    if code in "XZ":
        return ""
    if code == "L":
        return inner.split("|", 1)[0] if "|" in inner else inner.split("/")[0]
    return (
        {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}.get(inner, inner)
        if code == "E"
        else inner
    )


def perl_pod_texts(directory: Path = PERL_POD_DIR) -> Iterator[str]:
    """Sentences of the Perl 5.36 manual's POD files (perl-doc), release notes (perl*delta)
    skipped."""
    for path in sorted(directory.glob("*.pod")):
        if "delta" in path.name:
            continue
        yield from sentences_of(pod_paragraphs(path.read_text(encoding="utf-8", errors="replace")))


def kjv_texts(command: tuple[str, ...] = ("bible", "gen1:1-rev22:21")) -> Iterator[str]:
    """Sentences of the King James Bible as printed by the bible-kjv package's `bible`
    (chapter headings, then verses "  N text" wrapped on unindented lines)."""
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    yield from sentences_of(kjv_verses(output))


def kjv_verses(output: str) -> list[str]:
    verses: list[str] = []
    for line in output.splitlines():
        numbered = re.match(r"\s+\d+\s+(.*)", line)
        if numbered:
            verses.append(numbered.group(1))
        elif (
            line.strip()
            and verses
            and not line.startswith(" ")
            and not re.fullmatch(r"[1-3]?\s?[A-Z][A-Za-z ]+ \d+", line.strip())
        ):
            verses[-1] += " " + line.strip()
    return verses
