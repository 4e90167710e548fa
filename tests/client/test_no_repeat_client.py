"""`no_repeat_ngram_size`, the loop breaker, from the client library and the CLI: Client and
AsyncClient (decode, generate, generate_stream, decode_batch, decode_stream) and `retd decode`
/ `retd generate --no-repeat-ngram N` give, against the real daemon serving the shipped
checkpoint, exactly the texts `generate` gives here with the same setting; bad values are
refused client-side, before any call."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from retd.client import AsyncClient, Client, InvalidArgumentError, cli
from retd.client._requests import check_no_repeat_ngram_size
from retd.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from retd.model.embed import load_split
from retd.model.generation import SamplingParams, generate
from tests.conftest import start_server

HEAD = load_split(Path(__file__).parents[1] / "data" / "heldout_head", "heldout")
QUERIES = HEAD.embeddings[:6].astype(np.float32)  # real embeddings of held-out sentences
MAX_NEW = 64
SIZES = (0, 3, 6)  # 0: plain greedy
# The CLI's other loop breakers off (the shipped card's eos_bias too): n-gram bans alone.
PLAIN_CLI = ["--repetition-penalty", "1", "--eos-bias", "0"]


@pytest.fixture(scope="module")
def expected() -> dict[int, list[str]]:
    """The shipped model's greedy texts for QUERIES per n-gram size, computed here."""
    loaded = load_checkpoint(DEFAULT_CHECKPOINT)
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = {}
    for n in (*SIZES, 256):
        params = [SamplingParams(MAX_NEW, no_repeat_ngram_size=n)] * len(QUERIES)
        results = generate(model, torch.from_numpy(QUERIES), params, tokenizer=tokenizer)
        texts[n] = [r.text for r in results]
    for n in SIZES[1:]:  # else the tests below could not tell the setting was sent
        assert texts[n] != texts[0], f"no_repeat_ngram_size={n} changes no answer"
    return texts


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A daemon serving the trained, shipped checkpoint."""
    server = start_server(
        tmp_path_factory.mktemp("no_repeat_client"),
        ["--checkpoint", str(DEFAULT_CHECKPOINT)],
        plain_decode=False,  # the server's own default loop breakers
    )
    yield server.address
    assert server.stop() == 0, server.log()


def differing(expected: dict[int, list[str]], n: int) -> int:
    """The index of a query whose text with `n` is not the plain greedy one."""
    return next(i for i, (a, b) in enumerate(zip(expected[0], expected[n], strict=True)) if a != b)


# --- the library ---------------------------------------------------------------------------


def test_client_methods_send_it(address: str, expected: dict[int, list[str]]) -> None:
    with Client(address, timeout=60) as client:
        for n in SIZES:
            size = n or None  # Generate: None and 0 are both off
            kw = dict(max_new_tokens=MAX_NEW, no_repeat_ngram_size=size)
            # The decode forms: an explicit 0 is off, None the server's default loop breakers.
            dkw = dict(
                max_new_tokens=MAX_NEW, no_repeat_ngram_size=n, repetition_penalty=1, eos_bias=0
            )
            assert [client.decode(q, **dkw).text for q in QUERIES] == expected[n], n
            for i in range(2):
                assert client.generate(QUERIES[i], temperature=0, **kw).text == expected[n][i]
                chunks = client.generate_stream(QUERIES[i], temperature=0, **kw)
                assert "".join(c.text for c in chunks) == expected[n][i]
            batch = client.decode_batch(QUERIES, **dkw)
            assert [item.unwrap().text for item in batch] == expected[n], n
            answers = {a.id: a.unwrap().text for a in client.decode_stream(QUERIES, **dkw)}
            assert answers == {str(i): text for i, text in enumerate(expected[n])}, n
        # The largest size both sides take: no 256-byte run can repeat in 64 bytes.
        assert (
            client.decode(QUERIES[0], **dict(dkw, no_repeat_ngram_size=256)).text
            == (expected[256][0])
        )


def test_async_client_methods_send_it(address: str, expected: dict[int, list[str]]) -> None:
    async def main() -> dict[int, list[list[str]]]:
        seen: dict[int, list[list[str]]] = {}
        async with AsyncClient(address, timeout=60) as client:
            for n in SIZES:
                kw = dict(max_new_tokens=MAX_NEW, no_repeat_ngram_size=n)
                dkw = dict(kw, repetition_penalty=1.0, eos_bias=0.0)
                decoded = [(await client.decode(q, **dkw)).text for q in QUERIES]
                generated = [
                    (await client.generate(q, temperature=0, **kw)).text for q in QUERIES[:2]
                ]
                streamed = [
                    "".join([c.text async for c in client.generate_stream(q, temperature=0, **kw)])
                    for q in QUERIES[:2]
                ]
                batch = [item.unwrap().text for item in await client.decode_batch(QUERIES, **dkw)]
                answers = {
                    a.id: a.unwrap().text async for a in client.decode_stream(QUERIES, **dkw)
                }
                in_order = [answers[str(i)] for i in range(len(QUERIES))]
                seen[n] = [decoded, generated, streamed, batch, in_order]
        return seen

    for n, (decoded, generated, streamed, batch, in_order) in asyncio.run(main()).items():
        assert decoded == batch == in_order == expected[n], n
        assert generated == streamed == expected[n][:2], n


BAD = [
    (-1, "no_repeat_ngram_size: expected an integer >= 0, got -1"),
    (2.5, "no_repeat_ngram_size: expected an integer >= 0, got 2.5"),
    (True, "no_repeat_ngram_size: expected an integer >= 0, got True"),
    ("6", "no_repeat_ngram_size: expected an integer >= 0, got '6'"),
    (257, r"no_repeat_ngram_size: 257 is too large; expected 0 \(off\) to 256 tokens"),
]


@pytest.mark.parametrize("value, match", BAD)
def test_bad_sizes_are_refused_before_any_call(value: object, match: str) -> None:
    """No server listens on port 1: a call made would fail UNAVAILABLE, not INVALID_ARGUMENT."""
    q, kw = QUERIES[0], dict(no_repeat_ngram_size=value)
    with Client("127.0.0.1:1", timeout=5) as client:
        for call in (
            lambda: client.decode(q, **kw),
            lambda: client.generate(q, **kw),
            lambda: client.generate_stream(q, **kw),
            lambda: client.decode_batch(QUERIES, **kw),
            lambda: client.decode_stream(QUERIES, **kw),
        ):
            with pytest.raises(InvalidArgumentError, match=match):
                call()

    async def main() -> None:
        async with AsyncClient("127.0.0.1:1", timeout=5) as client:
            for call in (
                lambda: client.decode(q, **kw),
                lambda: client.generate(q, **kw),
                lambda: client.decode_batch(QUERIES, **kw),
            ):
                with pytest.raises(InvalidArgumentError, match=match):
                    await call()
            for stream in (
                lambda: client.generate_stream(q, **kw),
                lambda: client.decode_stream(QUERIES, **kw),
            ):
                with pytest.raises(InvalidArgumentError, match=match):
                    stream()  # at once, not on the first iteration

    asyncio.run(main())


def test_good_sizes_are_taken_as_they_are() -> None:
    assert check_no_repeat_ngram_size(None) == 0
    assert check_no_repeat_ngram_size(0) == 0
    assert check_no_repeat_ngram_size(np.int64(6)) == 6
    assert check_no_repeat_ngram_size(256) == 256


# --- the command line ----------------------------------------------------------------------


def retd(*argv: str) -> subprocess.CompletedProcess[str]:
    """`retd ARGV` in a subprocess: the venv's console script, as a user runs it."""
    script = Path(sys.executable).parent / "retd"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "retd.client.cli"]
    return subprocess.run(
        [*command, *argv], capture_output=True, encoding="utf-8", timeout=60, check=False
    )


def test_cli_no_repeat_ngram(address: str, expected: dict[int, list[str]], tmp_path: Path) -> None:
    i = differing(expected, 6)
    one, batch = tmp_path / "one.npy", tmp_path / "batch.npy"
    np.save(one, QUERIES[i])
    np.save(batch, QUERIES)
    common = ["--target", address, "--max-new-tokens", str(MAX_NEW)]

    off = PLAIN_CLI  # only the n-gram loop breaker
    done = retd("decode", str(one), *common, *off, "--no-repeat-ngram", "6")
    assert (done.returncode, done.stdout, done.stderr) == (0, expected[6][i] + "\n", "")
    done = retd("decode", str(batch), *common, *off, "--no-repeat-ngram", "3", "--json")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["result"]["text"] for line in done.stdout.splitlines()] == (
        expected[3]
    )
    done = retd(
        "generate", str(one), *common, "--temperature", "0", "--no-repeat-ngram", "6", "--stream"
    )
    assert (done.returncode, done.stdout) == (0, expected[6][i] + "\n"), done.stderr
    done = retd("decode", str(one), *common, "--no-repeat-ngram", "257")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        "error: INVALID_ARGUMENT: no_repeat_ngram_size: 257 is too large; "
        "expected 0 (off) to 256 tokens\n"
    )


def test_cli_text_mode_with_no_repeat_ngram(
    address: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--text` embeds with the sentence encoder, then decodes with the setting."""
    from retd.model.encoder import SentenceEncoder

    sentence = "The stock market fell sharply."
    vector = SentenceEncoder.load().encode([sentence])[0]
    with Client(address, timeout=60) as client:
        kw = dict(max_new_tokens=MAX_NEW, repetition_penalty=1.0, eos_bias=0.0)
        want = client.decode(vector, no_repeat_ngram_size=2, **kw).text
        plain = client.decode(vector, no_repeat_ngram_size=0, **kw).text
    assert want != plain  # "... Just Just Just Inc.": the flag must show
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    out = io.StringIO()
    argv = ["decode", "--target", address, "--max-new-tokens", str(MAX_NEW), "--text", sentence]
    assert cli.main([*argv, "--no-repeat-ngram", "2", *PLAIN_CLI], out=out) == 0
    assert out.getvalue() == want + "\n"
    assert capsys.readouterr().err == ""


def test_unset_loop_breakers_take_the_server_default(address: str) -> None:
    """None sends nothing (the server's default); explicit values go through; the CLI too."""
    import dataclasses

    from retd.server.config import DecodeDefaults

    loaded = load_checkpoint(DEFAULT_CHECKPOINT)
    params = SamplingParams(MAX_NEW, **dataclasses.asdict(DecodeDefaults().for_card(loaded.card)))
    results = generate(
        loaded.model, torch.from_numpy(QUERIES), [params] * len(QUERIES), tokenizer=loaded.tokenizer
    )
    want = [r.text for r in results]
    with Client(address, timeout=60) as client:
        assert [client.decode(q, max_new_tokens=MAX_NEW).text for q in QUERIES] == want
        batch = client.decode_batch(QUERIES, max_new_tokens=MAX_NEW)
        assert [item.unwrap().text for item in batch] == want
        answers = {
            a.id: a.unwrap().text for a in client.decode_stream(QUERIES, max_new_tokens=MAX_NEW)
        }
        assert answers == {str(i): t for i, t in enumerate(want)}
        explicit = client.decode(
            QUERIES[0], max_new_tokens=MAX_NEW, no_repeat_ngram_size=0, repetition_penalty=2.0,
            repetition_ngram_size=3,
        ).text  # fmt: skip
    (alone,) = generate(
        loaded.model,
        torch.from_numpy(QUERIES[:1]),
        [SamplingParams(MAX_NEW, repetition_penalty=2.0, repetition_ngram_size=3)],
        tokenizer=loaded.tokenizer,
    )
    assert explicit == alone.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"repetition_penalty": 0.5},
            r"repetition_penalty: expected a number in \[1, 10\] \(1 = off\), got 0.5",
        ),
        ({"repetition_penalty": "2"}, "repetition_penalty: expected a number in"),
        ({"repetition_penalty": True}, "repetition_penalty: expected a number in"),
        ({"repetition_ngram_size": 0}, "repetition_ngram_size: expected 1"),
        ({"repetition_ngram_size": 2.5}, "repetition_ngram_size: expected an integer >= 0"),
        ({"eos_bias": -21}, r"eos_bias: expected a number in \[-20, 20\] \(0 = off\)"),
        ({"eos_bias": float("nan")}, "eos_bias: expected a number in"),
        ({"eos_bias": "1"}, "eos_bias: expected a number in"),
    ],
)
def test_bad_loop_breakers_raise_before_sending(kwargs: dict[str, object], message: str) -> None:
    from retd.client._requests import loop_breakers

    with pytest.raises(InvalidArgumentError, match=message):
        loop_breakers(**kwargs)  # type: ignore[arg-type]
    assert loop_breakers() == {}
    assert loop_breakers(0, 1, 1) == {
        "no_repeat_ngram_size": 0, "repetition_penalty": 1.0, "repetition_ngram_size": 1
    }  # fmt: skip
    assert loop_breakers(eos_bias=-3) == {"eos_bias": -3.0}


def test_eos_bias_from_every_client_form(address: str, tmp_path: Path) -> None:
    """eos_bias 20 ends each answer at once, -20 runs it to max_new_tokens: from Client,
    AsyncClient and `retd decode --eos-bias`."""
    with Client(address, timeout=60) as client:
        ended = client.decode(QUERIES[0], eos_bias=20)
        assert (ended.text, ended.finish_reason) == ("", "eos")
        items = client.decode_batch(QUERIES[:2], max_new_tokens=24, eos_bias=-20)
        assert [i.unwrap().usage.generated_tokens for i in items] == [24, 24]
        (answer,) = client.decode_stream([QUERIES[0]], eos_bias=20)
        assert answer.unwrap().text == ""

    async def main() -> tuple[str, int]:
        async with AsyncClient(address, timeout=60) as client:
            ended = await client.decode(QUERIES[0], eos_bias=20)
            longest = await client.decode(QUERIES[0], max_new_tokens=24, eos_bias=-20)
            return ended.text, longest.usage.generated_tokens

    assert asyncio.run(main()) == ("", 24)
    one = tmp_path / "one.npy"
    np.save(one, QUERIES[0])
    done = retd("decode", str(one), "--target", address, "--eos-bias", "20", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] == ""
    done = retd("decode", str(one), "--target", address, "--eos-bias", "30")
    assert done.returncode == 2 and done.stdout == ""
    assert "eos_bias: expected a number in [-20, 20] (0 = off), got 30.0" in done.stderr
