"""`ckptd` command line: a thin dispatcher.

Each subcommand lives in ``ckptd/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
A :class:`~ckptd.errors.CkptdError` becomes one line on stderr and its exit
code; anything else is a bug and raises with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__, exitcodes
from .errors import CkptdError

COMMANDS = ("run", "ls", "verify", "inspect", "prune", "export", "pin", "save", "stop", "status", "config")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, documented code
        self.exit(exitcodes.USAGE, f"ckptd: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ckptd",
        description="Fault-tolerant training daemon for PyTorch: supervise a training run, "
        "checkpoint it atomically, survive preemption.",
        epilog="Exit codes: " + "; ".join(f"{k} {v}" for k, v in sorted(exitcodes.DESCRIPTIONS.items())),
    )
    parser.add_argument("--version", action="version", version=f"ckptd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"ckptd.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return exitcodes.USAGE
    try:
        return int(args.func(args) or 0)
    except CkptdError as exc:
        print(f"ckptd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ckptd ls | head`
        return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
