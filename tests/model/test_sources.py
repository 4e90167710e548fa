"""The corpus's source extractors on tiny fixtures, and the sentence splitter."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from retd.model import manuals
from retd.model import sources as src
from retd.model.sources import split_sentences


def test_splitter_breaks_sentences_but_not_abbreviations_or_initials() -> None:
    text = (
        "Mr. Smith went to Washington, e.g. by train. It rained! Did it? "
        'J. R. R. Tolkien wrote "The Hobbit." Then he slept.'
    )
    assert split_sentences(text) == [
        "Mr. Smith went to Washington, e.g. by train.",
        "It rained!",
        "Did it?",
        'J. R. R. Tolkien wrote "The Hobbit."',
        "Then he slept.",
    ]
    assert split_sentences("version 3.11 is out. lower case follows.") == [
        "version 3.11 is out. lower case follows."
    ]


words = st.text(alphabet="bdfghkwxyz", min_size=2, max_size=8)  # no abbreviation, no initial
sentence = st.builds(
    lambda ws, end: " ".join(ws).capitalize() + end,
    st.lists(words, min_size=1, max_size=8),
    st.sampled_from([".", "!", "?"]),
)


@given(st.lists(sentence, min_size=1, max_size=10))
def test_splitter_recovers_joined_sentences(sentences: list[str]) -> None:
    assert split_sentences(" ".join(sentences)) == sentences


@given(st.text(max_size=300))
def test_splitter_keeps_every_word_in_order(text: str) -> None:
    parts = split_sentences(text)
    assert " ".join(parts).split() == text.split()
    assert all(p == p.strip() and p for p in parts)


def _dictd(directory: Path, name: str, entries: list[tuple[str, str]]) -> None:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(n: int) -> str:
        out = ""
        while True:
            out = alphabet[n % 64] + out
            n //= 64
            if not n:
                return out

    data, index = b"", []
    for word, body in [("00-database-info", "about\n"), *entries]:
        raw = body.encode()
        index.append(f"{word}\t{b64(len(data))}\t{b64(len(raw))}")
        data += raw
    (directory / f"{name}.dict.dz").write_bytes(gzip.compress(data))
    (directory / f"{name}.index").write_text("\n".join(index) + "\n")


def test_gcide_entries_lose_heads_tags_and_citations(tmp_path: Path) -> None:
    body = (
        'Abdomen \\Ab*do"men\\, n. [L. abdomen (a word of uncertain\n'
        "   etymol.): cf. F. abdomen.]\n"
        "   1. (Anat.) The belly, or that part of the body between the\n"
        "      thorax and the pelvis. Also, the cavity of the belly.\n"
        "      [1913 Webster]\n\n"
        "         The boy was never seen again. --Shak.\n"
        "         [1913 Webster]\n"
    )
    _dictd(tmp_path, "gcide", [("abdomen", body)])
    assert list(src.gcide_texts(tmp_path)) == [
        "The belly, or that part of the body between the thorax and the pelvis.",
        "Also, the cavity of the belly.",
        "The boy was never seen again.",
    ]


def test_foldoc_and_jargon_keep_prose_only(tmp_path: Path) -> None:
    foldoc = (
        "Actors\n\n   <theory> A model for {concurrency} by {Carl Hewitt}.  Actors\n"
        "   are autonomous objects.\n\n   {(http://osl.cs.uiuc.edu/)}.\n\n"
        '   ["Laws for Communicating Parallel Processes", C. Hewitt].\n\n   (1994-11-08)\n'
    )
    jargon = "blue wire\n n.\n\n    Patch wires added to {circuit boards}.\n"
    _dictd(tmp_path, "foldoc", [("Actors", foldoc)])
    _dictd(tmp_path, "jargon", [("blue wire", jargon)])
    assert list(src.foldoc_texts(tmp_path)) == [
        "A model for concurrency by Carl Hewitt.",
        "Actors are autonomous objects.",
    ]
    assert list(src.jargon_texts(tmp_path)) == ["Patch wires added to circuit boards."]


def test_html_paragraphs_skip_code_and_flatten_inline_markup(tmp_path: Path) -> None:
    (tmp_path / "page.html").write_text(
        "<html><body><h1>Title</h1><p>Use <code>open()</code> to open a file. "
        "It returns a <a href='#'>file object</a>.</p><pre>x = 1. Not prose.</pre>"
        "<div class='highlight'><p>Tom &amp; Jerry are here.</p></div></body></html>"
    )
    (tmp_path / "genindex.html").write_text("<p>Index entry here, skipped.</p>")
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "x.html").write_text("<p>Static page is skipped.</p>")
    assert list(src.html_texts(tmp_path, skip=src.SPHINX_SKIP)) == [
        "Use open() to open a file.",
        "It returns a file object.",
        "Tom & Jerry are here.",
    ]


def test_man_pages_lose_roff_and_code(tmp_path: Path) -> None:
    page = (
        '.\\" Copyright comment\n.TH OPEN 2\n.SH NAME\nopen \\- open a file\n'
        ".SH SYNOPSIS\n.nf\n.B #include <fcntl.h>\n.fi\n.SH DESCRIPTION\n"
        "The\n.BR open ()\nsystem call opens the file specified by\n.IR pathname .\n"
        ".PP\nIt returns \\fBa\\fP new descriptor\\(emalways.\n.EX\nint fd = 3;\n.EE\n"
    )
    path = tmp_path / "open.2.gz"
    path.write_bytes(gzip.compress(page.encode()))
    redirect = tmp_path / "creat.2.gz"
    redirect.write_bytes(gzip.compress(b".so man2/open.2\n"))
    assert list(manuals.man_page_texts([path, redirect])) == [
        "The open() system call opens the file specified by pathname.",
        "It returns a new descriptor - always.",
    ]


def test_pod_paragraphs_drop_commands_and_code() -> None:
    pod = (
        "=head1 NAME\n\nperlfoo - x\n\n"
        "Use B<print> with L<perlfunc/print> E<lt>here.\n\n    my $x = 1;\n"
    )
    assert manuals.pod_paragraphs(pod) == ["perlfoo - x", "Use print with perlfunc <here."]


def test_kjv_verses_join_wrapped_lines_without_headings() -> None:
    output = (
        "\nGenesis 1\n\n  1 In the beginning God created\nthe heaven.\n  2 And it was so.\n"
        "\n1 Kings 2\n  1 Now the days drew nigh.\n"
    )
    assert manuals.kjv_verses(output) == [
        "In the beginning God created the heaven.",
        "And it was so.",
        "Now the days drew nigh.",
    ]


def test_wikipedia_and_chitchat_json(tmp_path: Path) -> None:
    wiki = tmp_path / "summaries.json"
    wiki.write_text(
        json.dumps({"B": {"extract": "Bees fly. They make honey."}, "A": {"extract": "Ants dig."}})
    )
    assert list(src.wikipedia_texts(wiki)) == ["Ants dig.", "Bees fly.", "They make honey."]
    chat = tmp_path / "dataset.json"
    chat.write_text(
        json.dumps(
            {"c1": {"messages": [[{"text": "Hello there. How are you?"}], [{"text": "fine"}]]}}
        )
    )
    assert list(src.chitchat_texts(chat)) == ["Hello there.", "How are you?", "fine"]
