"""ckptd save [--wait] [--dir DIR]: ask the running supervisor for a checkpoint now."""

from __future__ import annotations

import argparse
import time

from .. import protocol
from ..errors import CkptdError
from ..supervisor.client import ControlClient, default_dir
from . import add_node_argument, positive_seconds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("save", help="checkpoint a running job now",
                       description="Ask the `ckptd run` supervising DIR to checkpoint the running trainer at its "
                       "next step and keep training. Exit 7 when no supervisor runs for DIR.")
    add_client_arguments(p, "wait until the checkpoint is committed (durable) and print it; the trainer then "
                         "writes it at full speed instead of pacing it beside training")
    p.set_defaults(func=run)


def add_client_arguments(p: argparse.ArgumentParser, wait_help: str) -> None:
    p.add_argument("--dir", default=None, help="checkpoint directory of the run (default: $CKPTD_DIR or ./checkpoints)")
    add_node_argument(p)
    p.add_argument("--wait", action="store_true", help=wait_help)
    p.add_argument("--timeout", type=positive_seconds, default=None, metavar="SECONDS",
                   help="give up waiting after SECONDS, a number > 0 (default: wait as long as it takes)")


def deadline(args: argparse.Namespace) -> float | None:
    return time.monotonic() + args.timeout if args.timeout else None


def run(args: argparse.Namespace) -> int:
    with ControlClient(args.dir or default_dir(), node_rank=args.node_rank) as client:
        client.send(protocol.SAVE, wait=args.wait)
        try:
            for msg in client.replies(deadline(args)):
                kind = msg["type"]
                if kind == protocol.ACCEPTED and not args.wait:
                    print(f"checkpoint requested (request {msg.get('request_id')})")
                    return 0
                if kind == protocol.SAVED:
                    print(f"checkpoint committed: {msg.get('path')} (step {msg.get('step')}, {msg.get('kind')})")
                    return 0
                if kind == protocol.SAVE_FAILED:
                    raise CkptdError(f"the checkpoint failed: {msg.get('error')}")
                if kind == protocol.ERROR:
                    raise CkptdError(str(msg.get("error")))
        except TimeoutError:
            raise CkptdError(f"no checkpoint within {args.timeout:g} s; it may still be written") from None
    raise CkptdError("the supervisor closed the connection before the checkpoint was committed")
