"""The ``retd`` command line: talk to a retd server, or run one (``retd serve``).

The client commands need only the thin client; ``serve``, ``init-checkpoint`` and ``bench``
are handed to :mod:`retd.server.cli`, imported only then (it needs ``retd[server]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from ._balancing import TargetError
from .client import DEFAULT_TARGET, Client
from .errors import RetdError
from .inputs import EmbeddingInputError, read_embeddings
from .types import DecodeBatchItem, HealthStatus, ModelVersionStatus, RepositoryListing

__all__ = ["SERVER_COMMANDS", "build_parser", "main"]

#: Subcommands implemented by the server package, with their one-line help: the one table of
#: them (`retd.server.cli` and `retd.model.commands` take their help from it).
SERVER_COMMANDS = {
    "serve": "run the retd server (needs retd[server]; `retd serve --help`)",
    "init-checkpoint": "write a checkpoint for the server (needs retd[server])",
    "bench": "benchmark a server or a model (needs retd[server])",
    "corpus": "build the training corpus from sixteen Debian and PyPI sources (needs retd[train])",
    "embed": "embed the corpus with the sentence encoder (needs retd[encoder])",
    "train": "train a RET decoder on the embedded corpus (needs retd[encoder])",
    "eval": "score a checkpoint on the held-out split (needs retd[encoder])",
    "build-phrase-bank": "embed a text file into a phrase bank to serve (needs retd[encoder])",
}

_EPILOG = """\
EMBEDDING is a .npy file, a JSON array literal, or - (the default) to read stdin
(.npy bytes or a JSON array). A 2-D array is a batch: one output line per row.

examples:
  retd health
  retd decode emb.npy
  retd decode --text "A small dog barked at the mailman."   # needs `make encoder`
  python -c 'import json; print(json.dumps([0.0] * 768))' | retd decode --json
  retd generate emb.npy --temperature 0.8 --seed 7 --stream
  retd decode emb.npy --no-repeat-ngram 0 --repetition-penalty 1   # plain greedy: may loop
  retd info --json
  retd decode emb.npy --model ret --version 1   # one version of a repository model
  retd repo list                                # every model version the server knows
  retd repo load ret --version 1                # load (and pin) version 1 beside the newest
  retd repo unload ret --version 1
  retd serve --help

The server address comes from --target, else $RETD_TARGET, else 127.0.0.1:50051; it may
name several replicas (a,b,c or dns:///name:port): calls are balanced over the healthy ones
(`retd repo` acts on one of them: give it one replica's address). A bearer token comes from
--token, else $RETD_TOKEN; TLS from --tls, --ca-cert, and --cert/--key for mutual TLS.
Exit status: 0 on success, 1 when `retd health` finds the server not serving,
2 on any error (printed as `error: CODE: details`).
"""


def _default_target() -> str:
    return os.environ.get("RETD_TARGET") or DEFAULT_TARGET


def package_version() -> str:
    """The installed retd's version (pyproject.toml's)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retd")
    except PackageNotFoundError:  # run from a tree that was never installed
        return "unknown (not installed)"


class _OptionError(Exception):
    """A bad connection option (a TLS file that cannot be read, a malformed token)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the client commands (the server's are listed, not parsed)."""
    parser = argparse.ArgumentParser(
        prog="retd",
        description="retd: decode 768-dim sentence embeddings into text over gRPC.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"retd {package_version()}", help="print it"
    )
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=_default_target(),
        help=f"server address (default: $RETD_TARGET or {DEFAULT_TARGET}); several replicas "
        "as HOST:PORT,HOST:PORT,... or dns:///NAME:PORT are balanced round-robin, with retries "
        "of the calls safe to repeat",
    )
    connection.add_argument(
        "--timeout", type=float, metavar="S", help="deadline of the call in seconds"
    )
    connection.add_argument(
        "--token",
        default=os.environ.get("RETD_TOKEN") or None,
        help="bearer token sent as `authorization: Bearer TOKEN` (default: $RETD_TOKEN, "
        "which other users cannot read from the process list)",
    )
    connection.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's CAs"
    )
    connection.add_argument(
        "--ca-cert",
        metavar="PEM",
        help="trust the CA in this PEM file for the server's certificate (implies --tls)",
    )
    connection.add_argument(
        "--cert", metavar="PEM", help="client certificate for mutual TLS (with --key)"
    )
    connection.add_argument("--key", metavar="PEM", help="client private key for mutual TLS")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", metavar="M", help="model name (default: the server's default)")
    model.add_argument(
        "--version",
        type=int,
        default=0,
        metavar="N",
        help="version N of the model in the server's model repository (default 0: the "
        "newest loaded one)",
    )
    decoding = argparse.ArgumentParser(add_help=False)
    decoding.add_argument(
        "embedding",
        nargs="?",
        metavar="EMBEDDING",
        help="a .npy file, a JSON array, or - for stdin (default)",
    )
    decoding.add_argument(
        "--text",
        action="append",
        metavar="TEXT",
        help="embed TEXT with the sentence encoder and decode that (repeatable; a batch when "
        "repeated; needs the encoder: `make encoder`)",
    )
    decoding.add_argument(
        "--max-new-tokens", type=int, metavar="N", help="bytes to generate at most"
    )
    decoding.add_argument(
        "--no-repeat-ngram",
        type=int,
        metavar="N",
        help="loop breaker: never generate a byte that would repeat a byte N-gram already in "
        "the text (0: off; at most 256; unset: decode takes the server's default loop "
        "breakers, generate none)",
    )
    decoding.add_argument(
        "--priority",
        type=int,
        metavar="P",
        help="higher is served first when requests wait for a slot; FIFO among equals (0)",
    )
    decoding.add_argument(
        "--json", action="store_true", help="print the full result as JSON (one line per item)"
    )

    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = [connection, model]
    formatter = argparse.RawDescriptionHelpFormatter

    decode = commands.add_parser(
        "decode",
        parents=[*common, decoding],
        formatter_class=formatter,
        help="decode embedding(s) to text, greedily",
        description="Decode one embedding (or a 2-D batch, one line per row) to text, "
        "greedily. Newlines inside a text are printed as \\n in batch mode; "
        "use --json for exact text.",
    )
    decode.add_argument(
        "--repetition-penalty",
        type=float,
        metavar="P",
        help="loop breaker: divide (multiply, when negative) the logit of a byte that would "
        "repeat a byte n-gram of --repetition-ngram bytes by P (1: off; at most 10; unset: "
        "the server's default)",
    )
    decode.add_argument(
        "--repetition-ngram",
        type=int,
        metavar="N",
        help="the n-gram size --repetition-penalty looks at (1: every byte generated; at most "
        "256; unset: the server's default)",
    )
    decode.set_defaults(func=_decode)

    generate = commands.add_parser(
        "generate",
        parents=[*common, decoding],
        formatter_class=formatter,
        help="generate text from one embedding with sampling",
        description="Generate text from one embedding with sampling parameters.",
    )
    generate.add_argument("--temperature", type=float, help="0 is greedy (default: 1.0)")
    generate.add_argument("--top-k", type=int, metavar="K", help="keep the K likeliest bytes")
    generate.add_argument("--top-p", type=float, metavar="P", help="nucleus threshold in (0, 1]")
    generate.add_argument("--seed", type=int, help="seed for reproducible sampling")
    generate.add_argument(
        "--stop", action="append", metavar="TEXT", help="stop at TEXT (repeatable)"
    )
    generate.add_argument("--stream", action="store_true", help="print text as it is generated")
    generate.set_defaults(func=_generate)

    info = commands.add_parser(
        "info",
        parents=common,
        help="describe a model",
        description="Describe a model: one `field: value` line each, then its card as "
        "indented JSON (--json: all of it as one JSON object).",
    )
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)

    models = commands.add_parser(
        "models",
        parents=[connection],
        help="list the server's models",
        description="List the server's models; * marks the default.",
    )
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(func=_models)

    health = commands.add_parser(
        "health",
        parents=[connection],
        help="check the server's health (exit 0 when SERVING)",
        description="Query grpc.health.v1; exit 0 when SERVING, 1 otherwise, 2 on error.",
    )
    health.add_argument(
        "--service", default="", help='service name (default: "", the whole server)'
    )
    health.set_defaults(func=_health)

    repo = commands.add_parser(
        "repo",
        help="list, load and unload model versions (the admin service)",
        description="The server's model repository (`retd serve --model-repo DIR`): list "
        "its model versions, load or unload one. A server with --auth-tokens or "
        "--admin-tokens needs --token (an admin one); a server on a non-loopback address "
        "without tokens refuses these calls.",
    )
    actions = repo.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        parents=[connection],
        help="every model version: ready, loading, unloading, failed, or on disk",
        description="List every model version the server knows; * marks the version that "
        "calls naming none get.",
    )
    listing.add_argument("model", nargs="?", default="", metavar="MODEL", help="only MODEL's")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_repo_list)
    for action, text, what in (
        ("load", "load a model version and wait until it serves", "load (0: the newest)"),
        ("unload", "unload a model version once its calls finish", "unload (0: every one)"),
    ):
        sub = actions.add_parser(action, parents=[connection], help=text, description=text + ".")
        sub.add_argument("model", metavar="MODEL", help="model name")
        sub.add_argument(
            "--version", type=int, default=0, metavar="N", help=f"the version to {what}"
        )
        sub.add_argument("--json", action="store_true", help="print JSON")
        sub.set_defaults(func=_repo_load if action == "load" else _repo_unload)

    for name, text in SERVER_COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


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


def _embeddings(args: argparse.Namespace) -> Any:
    """The EMBEDDING argument's array, or the encoder's embeddings of the --text values."""
    if not args.text:
        return read_embeddings(args.embedding)
    if args.embedding is not None:
        raise EmbeddingInputError("give either EMBEDDING or --text, not both")
    try:
        from retd.model.encoder import EncoderError, SentenceEncoder
    except ImportError as err:
        raise EmbeddingInputError(
            f"--text needs the sentence encoder, which is not installed ({err}): run "
            "`make encoder` in the retd checkout (it installs retd[encoder] and the encoder's "
            "weights into .venv)"
        ) from err
    try:
        vectors = SentenceEncoder.load().encode(args.text)
    except EncoderError as err:
        raise EmbeddingInputError(f"--text: {err}") from err
    return vectors[0] if len(args.text) == 1 else vectors


def _decode(args: argparse.Namespace, out: TextIO) -> int:
    embeddings = _embeddings(args)
    with _client(args) as client:
        if embeddings.ndim == 1:
            result = client.decode(
                embeddings,
                model=args.model,
                version=args.version,
                max_new_tokens=args.max_new_tokens,
                no_repeat_ngram_size=args.no_repeat_ngram,
                repetition_penalty=args.repetition_penalty,
                repetition_ngram_size=args.repetition_ngram,
                priority=args.priority,
            )
            if args.json:
                _print_json(result, out)
            else:
                print(result.text, file=out)
            return 0
        items = client.decode_batch(
            embeddings,
            model=args.model,
            version=args.version,
            max_new_tokens=args.max_new_tokens,
            no_repeat_ngram_size=args.no_repeat_ngram,
            repetition_penalty=args.repetition_penalty,
            repetition_ngram_size=args.repetition_ngram,
            priority=args.priority,
        )
    return _print_batch(items, out, as_json=args.json)


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
            if args.json:
                _print_json(result, out)
            else:
                print(result.text, file=out)
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


def _run_server_command(argv: list[str]) -> int:
    try:
        from retd.server.cli import main as server_main
    except ImportError as err:
        _print_error(
            f"`retd {argv[0]}` needs the server, which is not installed or failed to import "
            f"({err}). Install it with `make venv` in the retd checkout (it installs "
            "retd[server] into .venv)"
        )
        return 2
    return int(server_main(argv) or 0)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run ``retd`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SERVER_COMMANDS:
        return _run_server_command(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args, out if out is not None else sys.stdout)
    except RetdError as err:
        _print_error(f"{err.code.name}: {err.details}")
    except (EmbeddingInputError, TargetError, _OptionError) as err:
        _print_error(str(err))
    except BrokenPipeError:  # the reader went away (e.g. `| head`): not worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
