"""The ``lrscope`` command: ``curve``, ``plot``, ``check``, ``merge`` and ``demo``.

Each subcommand module exposes ``register(subparsers)``; its parser sets ``run``, a
function of the parsed arguments returning the exit code.  Bad input ends with a
one-line error and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lrscope import curve_command, demo, merge, plot
from lrscope.findings import command as check_command


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lrscope", description="See the learning rate your optimizer really applies."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    curve_command.register(subparsers)
    plot.register(subparsers)
    check_command.register(subparsers)
    merge.register(subparsers)
    demo.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    >>> main(["curve", "adam", "--steps", "0"])
    2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        return int(args.run(args) or 0)
    except (UsageError, ValueError) as error:
        print(f"lrscope {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        print(f"lrscope {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
