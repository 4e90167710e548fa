"""RET's tokenizers: token ids <-> text, every token a byte string.

Ids 0..255 are the single bytes (id = byte value) in every tokenizer, so byte 0 doubles as EOS
in all of them. The byte tokenizer (`BYTES`, RET v2.1's first) has only those. A byte-level
BPE tokenizer adds merged tokens from id 256 on (" the", "ing", ...): the same text in ~2.5x
fewer tokens, and words the model can pick whole. It is trained on the corpus with Hugging
Face `tokenizers` (`train_bpe`) and saved beside a checkpoint's weights in that library's
format (`tokenizer.json`). Decoding needs only the table of byte strings, so the server never
imports `tokenizers`; encoding text (training, evaluation) does.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

EOS_ID = 0
VOCAB_SIZE = 256  # of the byte tokenizer
_REPLACEMENT = "\ufffd"
TOKENIZER_FILE = "tokenizer.json"


def encode(text: str) -> list[int]:
    """The UTF-8 bytes of text, as token ids."""
    return list(text.encode("utf-8"))


def decode(token_ids: Iterable[int]) -> str:
    """Bytes back to text. Never raises: invalid UTF-8 and ids outside 0..255 become U+FFFD."""
    return BYTES.decode(token_ids)


@cache
def _byte_symbols() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's, which `tokenizers`' ByteLevel uses): one printable
    character per byte; symbol -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            symbols[chr(256 + extra)] = b
            extra += 1
    return symbols


class Tokenizer:
    """Ids <-> text for one model: `pieces[i]` is the bytes of token i."""

    def __init__(self, pieces: Sequence[bytes], spec: str | None = None) -> None:
        if len(pieces) < 256 or any(pieces[b] != bytes([b]) for b in range(256)):
            raise ValueError("a tokenizer's ids 0..255 must be the single bytes 0..255")
        self.pieces: tuple[bytes, ...] = tuple(pieces)
        self._spec = spec  # the tokenizer.json text; None for the byte tokenizer
        self._encoder: Any = None

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def kind(self) -> str:
        return "bytes" if self._spec is None else "bpe"

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size})"

    def decode(self, token_ids: Iterable[int]) -> str:
        """Never raises: invalid UTF-8 and unknown ids become U+FFFD."""
        parts: list[str] = []
        run = bytearray()
        for token in token_ids:
            try:
                value = operator.index(token)
            except TypeError:
                value = -1
            if 0 <= value < len(self.pieces):
                run += self.pieces[value]
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            parts.append(_REPLACEMENT)
            run.clear()
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no EOS). BPE needs the `tokenizers` package."""
        if self._spec is None:
            return [list(t.encode("utf-8")) for t in texts]
        if self._encoder is None:
            from tokenizers import Tokenizer as HFTokenizer

            self._encoder = HFTokenizer.from_str(self._spec)
        return [e.ids for e in self._encoder.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def to_json(self) -> str:
        """tokenizer.json's text (`tokenizers`' format); the byte tokenizer has none."""
        if self._spec is None:
            raise ValueError(
                "the byte tokenizer is not saved: checkpoints without tokenizer.json use it"
            )
        return self._spec

    @property
    def sha256(self) -> str:
        data = b"bytes" if self._spec is None else self._spec.encode("utf-8")
        return hashlib.sha256(data).hexdigest()

    def card(self) -> dict[str, Any]:
        """What a checkpoint's card records about it."""
        card: dict[str, Any] = {"kind": self.kind, "vocab_size": self.vocab_size}
        if self._spec is not None:
            card |= {"file": TOKENIZER_FILE, "sha256": self.sha256}
        return card

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """A byte-level BPE from tokenizer.json's text; ValueError if it is not one we made."""
        try:
            spec = json.loads(text)
            vocab: dict[str, int] = spec["model"]["vocab"]
            if spec["model"]["type"] != "BPE" or spec["pre_tokenizer"]["type"] != "ByteLevel":
                raise ValueError("not a byte-level BPE")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"not a byte-level BPE tokenizer.json: {exc}") from exc
        symbols = _byte_symbols()
        pieces = [b""] * len(vocab)
        for token, i in vocab.items():
            if not (isinstance(i, int) and 0 <= i < len(vocab)) or pieces[i]:
                raise ValueError(
                    f"tokenizer.json: token ids must be 0..{len(vocab) - 1}, once each"
                )
            try:
                pieces[i] = bytes(symbols[c] for c in token)
            except KeyError as exc:
                raise ValueError(f"tokenizer.json: {token!r} is not byte-level") from exc
        return cls(pieces, text)


BYTES = Tokenizer([bytes([b]) for b in range(256)])


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of vocab_size tokens learned on texts (needs `tokenizers`). Its ids
    0..255 are the bytes and the merged tokens follow in the order they were learned."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size <= 256:
        raise ValueError(f"vocab_size must be > 256 (256 is the byte tokenizer), got {vocab_size}")
    learner = HFTokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    learner.train_from_iterator(texts, trainer)
    learned = json.loads(learner.to_str())["model"]
    merges: list[tuple[str, str]] = []
    for merge in learned["merges"]:  # "a b" in older `tokenizers`, ["a", "b"] in newer
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merges.append((left, right))
    # Renumber: byte b is id b, then each merge's product in learning order.
    by_byte = {b: s for s, b in _byte_symbols().items()}
    vocab = {by_byte[b]: b for b in range(256)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return Tokenizer.from_json(tokenizer.to_str())
