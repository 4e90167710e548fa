"""The client commands of ``retd`` (``decode``, ``generate``, ``info``, ``models``,
``health``, ``repo``): each takes the parsed arguments and the output stream and returns the
exit status; and how they print (text, JSON, tables, errors)."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any, TextIO

from ._balancing import TargetError
from .client import Client
from .errors import RetdError
from .inputs import EmbeddingInputError, read_embeddings
from .types import DecodeBatchItem, HealthStatus, ModelVersionStatus, RepositoryListing


class _OptionError(Exception):
    """A bad connection option (a TLS file that cannot be read, a malformed token)."""


class _MissingError(Exception):
    """What a command needs from another retd package is not installed."""


# --- output --------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, RetdError):
        return {"code": value.code.name, "details": value.details}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _print_json(value: Any, out: TextIO) -> None:
    print(json.dumps(_jsonable(value), ensure_ascii=False), file=out, flush=True)


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


# --- commands ------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    try:
        return Client(
            args.target,
            timeout=args.timeout,
            token=args.token,
            tls=args.tls,
            root_certificates=args.ca_cert,
            certificate_chain=args.cert,
            private_key=args.key,
        )
    except OSError as err:
        raise _OptionError(f"cannot read {err.filename}: {err.strerror}") from err
    except ValueError as err:  # TargetError is one: reported the same way
        if isinstance(err, TargetError):
            raise
        raise _OptionError(
            str(err).replace("certificate_chain and private_key", "--cert and --key")
        ) from err


def registered(group: str, name: str, needs: str) -> Any:
    """What another retd package registers as `name` in the entry-point `group` (pyproject's
    ``[project.entry-points]``), loaded now: how the client reaches the server and the
    encoder without importing them. `needs` tells how to install it when it cannot load."""
    found = entry_points(group=group, name=name)
    try:
        if not found:
            raise ImportError(f"no {group} entry point named {name!r}")
        return next(iter(found)).load()
    except ImportError as err:
        raise _MissingError(f"{needs}, which is not installed or failed to import ({err})") from err


def _embeddings(args: argparse.Namespace) -> Any:
    """The EMBEDDING argument's array, or the encoder's embeddings of the --text values."""
    if not args.text:
        return read_embeddings(args.embedding)
    if args.embedding is not None:
        raise EmbeddingInputError("give either EMBEDDING or --text, not both")
    try:
        encode = registered(
            "retd.encoders", "all-mpnet-base-v2", "--text needs the sentence encoder"
        )
    except _MissingError as err:
        raise EmbeddingInputError(
            f"{err}: run `make encoder` in the retd checkout (it installs retd[encoder] and "
            "the encoder's weights into .venv)"
        ) from err
    try:
        vectors = encode(args.text)
    except RuntimeError as err:  # the encoder's weights are missing or not the expected file
        raise EmbeddingInputError(f"--text: {err}") from err
    return vectors[0] if len(args.text) == 1 else vectors


def _decode(args: argparse.Namespace, out: TextIO) -> int:
    embeddings = _embeddings(args)
    options = dict(
        model=args.model,
        version=args.version,
        max_new_tokens=args.max_new_tokens,
        no_repeat_ngram_size=args.no_repeat_ngram,
        repetition_penalty=args.repetition_penalty,
        repetition_ngram_size=args.repetition_ngram,
        eos_bias=args.eos_bias,
        priority=args.priority,
    )
    with _client(args) as client:
        if embeddings.ndim == 1:
            result = client.decode(embeddings, **options)
            _print_result(result, out, as_json=args.json)
            return 0
        items = client.decode_batch(embeddings, **options)
    return _print_batch(items, out, as_json=args.json)


def _print_result(result: Any, out: TextIO, *, as_json: bool) -> None:
    """One decoded or generated text: the text alone, or the whole result as JSON."""
    if as_json:
        _print_json(result, out)
    else:
        print(result.text, file=out)


def _print_batch(items: Sequence[DecodeBatchItem], out: TextIO, *, as_json: bool) -> int:
    status = 0
    for index, item in enumerate(items):
        if as_json:
            _print_json({"index": index, "result": item.result, "error": item.error}, out)
        elif item.result is not None:
            print(_one_line(item.result.text), file=out)
        else:
            print(file=out)
        if item.error is not None:
            _print_error(f"item {index}: {item.error}")
            status = 2
    out.flush()
    return status


def _generate(args: argparse.Namespace, out: TextIO) -> int:
    embedding = _embeddings(args)
    if embedding.ndim == 2:
        if embedding.shape[0] != 1:
            raise EmbeddingInputError(
                f"generate takes one embedding, got {embedding.shape[0]} "
                "(use `retd decode` for batches)"
            )
        embedding = embedding[0]
    params = dict(
        model=args.model,
        version=args.version,
        max_new_tokens=args.max_new_tokens,
        no_repeat_ngram_size=args.no_repeat_ngram,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        priority=args.priority,
    )
    with _client(args) as client:
        if not args.stream:
            result = client.generate(embedding, **params)
            _print_result(result, out, as_json=args.json)
            return 0
        stream = client.generate_stream(embedding, **params)
        try:
            for chunk in stream:
                if args.json:
                    _print_json(chunk, out)
                else:
                    print(chunk.text, end="", file=out, flush=True)
        finally:
            stream.close()
        if not args.json:
            print(file=out)
    return 0


def _info(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        info = client.model_info(args.model, version=args.version)
    if args.json:
        _print_json(info, out)
        return 0
    for f in dataclasses.fields(info):
        value = getattr(info, f.name)
        if f.name == "card":
            continue
        if isinstance(value, dict) or dataclasses.is_dataclass(value):
            value = json.dumps(_jsonable(value), ensure_ascii=False, sort_keys=True)
        print(f"{f.name}: {value}", file=out)
    # The card last, indented: it is long (encoder, training data, metrics, ...).
    card = json.dumps(info.card, ensure_ascii=False, sort_keys=True, indent=2)
    print("card:", file=out)
    print("\n".join(f"  {line}" for line in card.splitlines()), file=out)
    return 0


def _models(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        models = client.list_models()
        default = client.default_model()
    if args.json:
        _print_json({"default_model": default, "models": models}, out)
        return 0
    for m in models:
        mark = "*" if m.name == default else " "
        print(f"{mark} {m.name}\t{m.version}\t{m.architecture}\t{m.device}\t{m.dtype}", file=out)
    return 0


def _health(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(status.value, file=out)
    return 0 if status is HealthStatus.SERVING else 1


def _version_rows(rows: Sequence[ModelVersionStatus]) -> list[list[str]]:
    table = [["", "MODEL", "VERSION", "STATE", "KIND", "CALLS", "PATH / REASON"]]
    for row in rows:
        table.append(
            [
                "*" if row.serving else "",
                row.name,
                str(row.version),
                row.state.value,
                row.kind or "-",
                str(row.active_calls),
                _one_line(f"{row.path}: {row.reason}" if row.reason else row.path),
            ]
        )
    return table


def _print_table(table: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=False)]
        print("  ".join([*cells, line[-1]]).rstrip(), file=out)


def _repo_list(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        listing: RepositoryListing = client.list_versions(args.model)
    if args.json:
        _print_json(listing, out)
        return 0
    where = listing.repository or "none (models from --checkpoint/--model only)"
    print(f"repository: {where}", file=out)
    print(f"default model: {listing.default_model or '-'}", file=out)
    if not listing.versions:
        print(f"no model {args.model!r}" if args.model else "no models", file=out)
        return 0
    _print_table(_version_rows(listing.versions), out)
    return 0


def _describe(row: ModelVersionStatus) -> str:
    serving = ", serving calls naming no version" if row.serving else ""
    return f"{row.name} version {row.version}: {row.state.value}{serving} ({row.path})"


def _repo_load(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        status = client.load_model(args.model, args.version)
    if args.json:
        _print_json(status, out)
    else:
        print(f"loaded {_describe(status)}", file=out)
    return 0


def _repo_unload(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        released = client.unload_model(args.model, args.version)
    if args.json:
        _print_json(released, out)
        return 0
    for row in released:
        print(f"unloaded {row.name} version {row.version} ({row.path})", file=out)
    return 0
