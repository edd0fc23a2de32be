"""ckptd stop [--wait] [--dir DIR]: ask the running supervisor to checkpoint and stop."""

from __future__ import annotations

import argparse
from typing import Any

from .. import exitcodes, protocol
from ..errors import CkptdError
from ..supervisor.client import ControlClient, default_dir
from .save import add_client_arguments, deadline


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stop", help="checkpoint a running job and stop it",
                       description="Ask the `ckptd run` supervising DIR to stop the trainer with an emergency "
                       "checkpoint (as on SIGTERM). With --wait, exit 0 once the run stopped with its checkpoint "
                       "(`ckptd run` exits 85), 86 if none was confirmed. Exit 7 when no supervisor runs for DIR.")
    add_client_arguments(p, "wait until the run has stopped; print its exit code")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with ControlClient(args.dir or default_dir(), node_rank=args.node_rank) as client:
        client.send(protocol.STOP, wait=args.wait)
        try:
            for msg in client.replies(deadline(args)):
                kind = msg["type"]
                if kind == protocol.ACCEPTED and not args.wait:
                    print("stop requested")
                    return 0
                if kind == protocol.STOPPED:
                    code: Any = msg.get("exit_code")  # from the wire: any JSON value
                    print(f"run stopped: `ckptd run` exit code {code} "
                          f"({exitcodes.DESCRIPTIONS.get(code, 'see ckptd status')})" + _linger_note(msg))
                    if code in (exitcodes.OK, exitcodes.PREEMPTED):
                        return 0
                    return exitcodes.STOPPED_NO_CHECKPOINT if code == exitcodes.STOPPED_NO_CHECKPOINT \
                        else exitcodes.FAILURE
                if kind == protocol.ERROR:
                    raise CkptdError(str(msg.get("error")))
        except TimeoutError:
            raise CkptdError(f"the run did not stop within {args.timeout:g} s") from None
    raise CkptdError("the supervisor closed the connection before the run stopped")


def _linger_note(msg: dict) -> str:
    """`ckptd run` serves its final metrics for ``--metrics-linger`` seconds before it exits: say so, or a
    user waiting for the process sees it live on with no reason given."""
    linger = msg.get("linger")
    if not isinstance(linger, (int, float)) or isinstance(linger, bool) or not linger > 0:
        return ""
    return (f"; `ckptd run` serves its final metrics for {linger:g} s more (--metrics-linger), then exits "
            "(SIGTERM to it ends the wait)")
