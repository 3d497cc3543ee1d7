"""The command line declared as data: `Arg` and `Command` rows, and the one function that turns them into argparse.

The commands themselves, with every flag, default and help text, are the table in main.py; this module only knows
how to build a parser from such a table, so that adding a flag is adding a row, and a newcomer reads the whole
command line in one place without argparse calls in between. Usage errors are argparse's, on one line, exit 2;
the value types below (a port, a duration, a day, a count) say what they refuse in the same line.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shutil
import textwrap
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..accounts.keys import MAX_LIFETIME_S
from ..config import Settings
from ..config.limits import MAX_LIMIT

Handler = Callable[[argparse.Namespace, Settings], int]


@dataclass(frozen=True)
class Arg:
    """One argument: a positional (`key_id`) or an option (`--team`); the fields are argparse's own (None: not
    given to argparse, so its default applies)."""

    name: str
    help: str | None = None  # every argument has one: tests/test_cli.py walks every parser
    type: Callable[[str], Any] | None = None
    default: Any = None
    choices: Sequence[str] | None = None
    required: bool = False
    action: str | None = None  # "store_true" for a switch; "version" with `version`
    version: str | None = None
    metavar: str | None = None  # the value's name in the help (`--port PORT`); None: argparse's (the name's)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        given = {"help": self.help, "type": self.type, "default": self.default, "choices": self.choices,
                 "action": self.action, "version": self.version, "required": self.required or None,
                 "metavar": self.metavar}
        parser.add_argument(self.name, **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class Command:
    """A command (`serve`) or a group of subcommands (`keys create`, `keys list`, ...). A group's `run` receives
    every subcommand and reads which one from `args.<group>_cmd`."""

    name: str
    help: str  # one line, in the list of commands
    args: tuple[Arg, ...] = ()
    run: Handler | None = None
    subcommands: tuple[Command, ...] = ()
    description: str = ""  # the command's own --help says this (empty: `help`)


def switch(name: str, help: str | None = None) -> Arg:
    """An option without a value: present means true."""
    return Arg(name, help=help, action="store_true")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (argparse prints the whole usage first): exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


class _Formatter(argparse.HelpFormatter):
    """argparse's, except that a description keeps its paragraphs, and a paragraph whose lines are indented (the
    epilog's list of variables) is printed as it is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(p if "\n  " in p else textwrap.fill(" ".join(p.split()), width, initial_indent=indent,
                                                              subsequent_indent=indent)
                           for p in text.split("\n\n"))


def variables(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """An epilog listing environment variables: one name (or a few, comma-separated) and its meaning per row."""
    width, column = min(shutil.get_terminal_size().columns, 120) - 2, 24
    lines = [title]
    for names, meaning in rows:
        first = f"  {names}".ljust(column)
        if len(first) >= column:  # a long name (no room for a space after it) on a line of its own, as argparse does
            lines.append(first)
            first = " " * column
        lines += textwrap.wrap(meaning, width, initial_indent=first, subsequent_indent=" " * column)
    return "\n".join(lines)


def build(prog: str, description: str, options: Sequence[Arg], commands: Sequence[Command],
          epilog: str = "") -> argparse.ArgumentParser:
    """The parser for `options` (before the command) and `commands`; each command's handler is `args.func`."""
    parser = _Parser(prog=prog, description=description, epilog=epilog or None, formatter_class=_Formatter)
    for arg in options:
        arg.add_to(parser)
    _add_commands(parser, commands, "cmd")
    return parser


def _add_commands(parser: argparse.ArgumentParser, commands: Sequence[Command], dest: str) -> None:
    sub = parser.add_subparsers(dest=dest, required=True, metavar="COMMAND",
                                help="one of these (each has its own --help):")
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, description=command.description or _sentence(command.help),
                           formatter_class=_Formatter)
        for arg in command.args:
            arg.add_to(p)
        if command.subcommands:
            _add_commands(p, command.subcommands, f"{command.name}_cmd")
        if command.run is not None:
            p.set_defaults(func=command.run)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


# The value types the table names: a bad value is argparse's usage error, on one line, exit 2.


def parse_port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535: the socket layer would otherwise wrap 99999 round to 34463."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r} (0 to 65535)")
    return port


_DURATION = re.compile(r"([0-9]+)([smhdw]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `12h`, `30d`, `2w` -> seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 3600, 15m, 12h, 30d)")
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds > MAX_LIFETIME_S:
        raise argparse.ArgumentTypeError(f"{text!r} is longer than {MAX_LIFETIME_S // 86400} days")
    return seconds


def parse_day(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (use YYYY-MM-DD)") from None


def parse_count(text: str) -> int:
    """A limit flag's value: a whole number from 0 to MAX_LIMIT."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"not a non-negative whole number: {text!r}")
    if int(text) > MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"too large: {text!r} (at most {MAX_LIMIT})")
    return int(text)
