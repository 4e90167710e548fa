"""The `retd` CLI's server-side commands come from one table: the client lists them (without
importing the server) and the server parses exactly those, with the same one-line help."""

from __future__ import annotations

import argparse

from retd.client.cli import SERVER_COMMANDS, build_parser
from retd.server.cli import build_parser as build_server_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, str]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {choice.dest: choice.help or "" for choice in action._choices_actions}


def test_the_server_parses_exactly_the_commands_the_client_lists_with_their_help() -> None:
    assert _subcommands(build_server_parser()) == SERVER_COMMANDS


def test_the_client_lists_every_server_command_in_its_help() -> None:
    listed = _subcommands(build_parser())
    for name, text in SERVER_COMMANDS.items():
        assert listed[name] == text, name
