"""Server-side commands of the `retd` CLI: `serve`, `init-checkpoint`, `bench`, and the
training commands of `retd.model.commands` (`corpus`, `embed`, `train`, `eval`,
`build-phrase-bank`).

`retd.client.cli` hands these here through the `retd.cli` entry point `server`
(pyproject.toml), never by import, so the client never imports torch; and
`retd.server.bench` is imported only for `retd bench`, so serving never imports it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from retd.client.cli import SERVER_COMMANDS
from retd.model.commands import add_commands as add_training_commands
from retd.server.config import ConfigError, add_arguments, load_config

log = logging.getLogger("retd.server")


def _eval_served(args: argparse.Namespace) -> int:
    """`retd eval MODEL --server ADDRESS`: imported when run (it needs torch and the encoder)."""
    from retd.server.bench.served_eval import main

    return main(args)


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"retd serve: {exc}", file=sys.stderr)
        return 2
    from retd.model.kinds import CheckpointError
    from retd.server.app import serve
    from retd.server.logs import configure_logging

    configure_logging(config.log_level, config.log_format, config.access_log)

    try:
        return asyncio.run(serve(config))
    except (CheckpointError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    except OSError as exc:  # e.g. the metrics port is taken
        log.error("cannot start: %s", exc)
        return 1
    except RuntimeError as exc:  # e.g. grpc cannot bind the address
        log.error("cannot start on %s: %s", config.address, exc)
        return 1


def _init_checkpoint(args: argparse.Namespace) -> int:
    from retd.model.checkpoint import init_checkpoint

    path = init_checkpoint(args.out, seed=args.seed, architecture=args.architecture)
    print(f"wrote an untrained (random, seed {args.seed}) {args.architecture} checkpoint to {path}")
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; `bench`'s flags only when `command` is "bench" (they
    would import `retd.server.bench`)."""
    parser = argparse.ArgumentParser(prog="retd", description="retd server commands")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help=SERVER_COMMANDS["serve"],
        description="Serve RET models over gRPC (Decoder, health, reflection). Settings come "
        "from flags, then RETD_* environment variables, then the --config TOML file.",
    )
    add_arguments(serve)
    serve.set_defaults(run=_serve)
    init = commands.add_parser(
        "init-checkpoint",
        help=SERVER_COMMANDS["init-checkpoint"],
        description="Write a seeded random (untrained) checkpoint: safetensors weights and a "
        "JSON card. It decodes noise; the server warns when it serves one.",
    )
    init.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write")
    init.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    init.add_argument(
        "--architecture", default="ret_v21", help="registry name of the architecture (ret_v21)"
    )
    init.set_defaults(run=_init_checkpoint)
    bench = commands.add_parser(
        "bench",
        help=SERVER_COMMANDS["bench"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if command == "bench":
        import retd.server.bench as bench_module

        bench.description = bench_module.__doc__
        bench_module.add_arguments(bench)
        bench.set_defaults(run=bench_module.main)
    add_training_commands(commands, SERVER_COMMANDS, _eval_served)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":  # `python -m retd.server.cli CMD`: no entry points needed (gpu-check)
    sys.exit(main())
