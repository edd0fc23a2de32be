"""`ckptd` command line: a thin dispatcher.

Each subcommand lives in ``ckptd/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
A :class:`~ckptd.errors.CkptdError` becomes one line on stderr and its exit
code; so does an ``OSError`` a command did not put into words itself (exit 5,
or 4 for a path that is gone). Anything else is a bug and raises with a traceback.
File names that are not valid UTF-8 are printed escaped (``\\xff``), never as a crash.
"""

from __future__ import annotations

import argparse
import codecs
import importlib
import io
import sys
from typing import NoReturn

from . import exitcodes
from .errors import CkptdError
from .version import __version__

COMMANDS = (
    "run", "ls", "lineage", "verify", "inspect", "best", "diff", "prune", "export", "pin", "push", "pull", "save",
    "stop", "status", "config", "install_unit",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, documented code
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


def _escape(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: a byte of a non-UTF-8 file name (a lone surrogate) prints as ``\\xNN``."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    bad = exc.object[exc.start : exc.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else c.encode("ascii", "backslashreplace").decode() for c in bad), exc.end


codecs.register_error("ckptd-escape", _escape)


def _escape_unencodable_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="ckptd-escape")


def main(argv: list[str] | None = None) -> int:
    _escape_unencodable_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return exitcodes.USAGE
    try:
        return int(args.func(args) or 0)
    except CkptdError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ckptd ls | head`
        return exitcodes.OK
    except OSError as exc:  # storage trouble a command did not name itself: still one line
        from .commands import storage_error

        return _fail(storage_error(exc, f"ckptd {args.command}"))


def _fail(exc: CkptdError) -> int:
    from .supervisor.log import escape  # a path or value in the message may hold a newline or a terminal escape

    print(f"ckptd: error: {escape(exc)}", file=sys.stderr)
    return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
