"""The ``retd`` command line: talk to a retd server, or run one (``retd serve``).

The client commands need only the thin client; ``serve``, ``bench`` and the other
:data:`SERVER_COMMANDS` are handed to the server's CLI, which the server package registers as
the ``retd.cli`` entry point ``server`` (pyproject.toml): loaded only then, never imported by
the client (it needs ``retd[server]``).
The argument table is in ``_cli_parser``, the client commands in ``_cli_commands``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TextIO

from ._balancing import TargetError
from ._cli_commands import _MissingError, _OptionError, _print_error, registered
from ._cli_parser import SERVER_COMMANDS, build_parser
from ._cli_parser import package_version as package_version
from .errors import RetdError
from .inputs import EmbeddingInputError

__all__ = ["SERVER_COMMANDS", "build_parser", "main"]


def _run_server_command(argv: list[str]) -> int:
    try:
        server_main = registered("retd.cli", "server", f"`retd {argv[0]}` needs the server")
    except _MissingError as err:
        _print_error(
            f"{err}. Install it with `make venv` in the retd checkout (it installs "
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
