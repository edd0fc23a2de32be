"""ckptd run [options] SCRIPT.py [ARGS...] | ckptd run [options] -- CMD [ARGS...]: supervise a training run."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from .. import lineage, store
from ..errors import CkptdError, CorruptCheckpointError, NotFoundError
from ..supervisor import config as configmod
from . import UsageError, resolve_checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run and supervise a training script",
        usage="ckptd run [options] SCRIPT.py [ARGS...]\n       ckptd run [options] -- CMD [ARGS...]",
        description="Run SCRIPT.py with this Python (or any CMD after --), restart it from the latest valid "
        "checkpoint when it fails, checkpoint it on request or schedule, and stop it with an emergency "
        "checkpoint on SIGTERM/SIGINT. Arguments after the script pass through untouched. Every option also "
        "has a key in the --config YAML file (same name, underscores); options given here win.",
        epilog="Signals: TERM/INT = checkpoint and stop (twice: fast stop); USR1 = checkpoint now; "
        "HUP = reload schedules from --config. Exit codes: 0 finished, 85 stopped with a checkpoint, "
        "86 stopped without one, 70 gave up, 78 error in the --config file, 6 directory already supervised, "
        "4 script or command not found, 2 bad command line (a bad option value included).",
    )
    configmod.add_arguments(p)
    p.add_argument("--fresh", action="store_true",
                   help="start a new run: the checkpoints in the directory are moved to DIR/.previous/ (never "
                   "deleted); refused when that is ambiguous (an unfinished run of this same command, a multi-node "
                   "job, another writer in the directory)")
    p.add_argument("--resume-from", metavar="CKPT", default=None,
                   help="start from another run's checkpoint (a branch): a checkpoint path, OTHERDIR/latest or "
                   "OTHERDIR/N; once this run has checkpoints of its own, restarts resume those")
    p.add_argument("--resume-parts", metavar="PART,...", default=None, type=parts_arg,
                   help="with --resume-from: what the branch restores (default everything): a comma-separated list "
                   f"of {', '.join(lineage.PARTS)}; e.g. model for the weights only (the step then starts at 0)")
    p.add_argument("--stage", metavar="NAME", default=None, type=stage_arg,
                   help="the run's stage name (sft, rl, ...), recorded in every checkpoint's manifest when the "
                   "script's Checkpointer names none ($CKPTD_STAGE)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="SCRIPT.py [ARGS...] | -- CMD [ARGS...]",
                   help="the training script and its arguments, or -- and a command")
    p.set_defaults(func=run)


def command_argv(words: list[str]) -> list[str]:
    """The child's argv: a script runs with this interpreter; after ``--`` any command runs as is."""
    if words and words[0] == "--":
        words = words[1:]
        if not words:
            raise UsageError("nothing to run after --; write `ckptd run [options] -- CMD [ARGS...]`")
        if os.sep not in words[0] and shutil.which(words[0]) is None:
            raise NotFoundError(f"command {words[0]!r} not found on PATH; give its full path")
        return words
    if not words:
        raise UsageError("no script given; write `ckptd run [options] SCRIPT.py [ARGS...]` "
                         "or `ckptd run [options] -- CMD [ARGS...]`")
    if os.path.isdir(words[0]):
        raise UsageError(f"{words[0]!r} is a directory, not a training script; give the script "
                         f"(e.g. `ckptd run [options] {os.path.join(words[0], 'train.py')}`), or "
                         "`ckptd run [options] -- CMD [ARGS...]` to run a command")
    if not os.path.isfile(words[0]):
        raise NotFoundError(f"script {words[0]!r} not found; to run a command instead, "
                            f"write `ckptd run [options] -- {words[0]} ...`")
    return [sys.executable, *words]


def run(args: argparse.Namespace) -> int:
    overrides = configmod.cli_overrides(args)
    cfg = configmod.resolve(args.config, overrides)  # config errors first: nothing has started
    argv = command_argv(list(args.command))
    words = list(args.command[1:] if args.command[:1] == ["--"] else args.command)
    resume_from = branch_point(args.resume_from) if args.resume_from else None
    if args.resume_parts and not resume_from:
        raise UsageError("--resume-parts says what a branch restores: give --resume-from CKPT too")
    from ..supervisor.loop import Supervisor

    return Supervisor(cfg, argv, config_file=args.config, overrides=overrides, command=words, fresh=args.fresh,
                      resume_from=resume_from, resume_parts=args.resume_parts, stage=args.stage).run()


def branch_point(target: str) -> str:
    """``--resume-from CKPT``: the checkpoint's absolute path, after the manifest-level check (restore() then
    verifies every byte)."""
    path, info = resolve_checkpoint(target, None)
    info = info or store.inspect_checkpoint(path)
    if not info.valid:
        raise CorruptCheckpointError(path, info.reason)
    return os.path.abspath(path)


def parts_arg(text: str) -> str:
    """argparse type of ``--resume-parts``: names from lineage.PARTS, comma-separated."""
    try:
        return ",".join(lineage.check_parts(text))
    except CkptdError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("parts=('model',)", "model")) from None


def stage_arg(text: str) -> str:
    try:
        return lineage.check_stage(text, "--stage") or ""
    except CkptdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
