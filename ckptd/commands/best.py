"""ckptd best [DIR] --metric NAME[:min|max] [--json]: the best checkpoint of a directory by a metric.

The candidates are the checkpoints whose manifest carries the metric as a finite number (saved with the
checkpoint, or attached afterwards with ``ck.report(step, ...)``), best first; a tie goes to the newer step.
The best one is verified in full (every checksum) before it is named; one that fails is skipped with a
warning on stderr and the next is tried, so the answer is always a checkpoint ``restore()`` would accept.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .. import lineage, retention, store
from ..errors import CkptdError, NotFoundError
from ..progress import Progress
from . import UsageError, add_dir_argument, existing_dir, format_metrics, print_json, root_from

METRIC_HELP = ("NAME[:min|max]: the metric to rank by and which way is better (default min, e.g. val_loss; "
               "accuracy:max)")


@dataclass(frozen=True)
class Choice:
    info: store.CheckpointInfo
    metric: str
    mode: str
    candidates: int
    skipped: tuple[tuple[str, str], ...]  # (name, why) of better-ranked checkpoints that failed verification

    @property
    def value(self) -> float:
        return float(self.info.metrics[self.metric])

    def as_json(self) -> dict[str, object]:
        return {"path": self.info.path, "name": self.info.name, "step": self.info.step, "kind": self.info.kind,
                "metric": self.metric, "mode": self.mode, "value": self.value, "metrics": self.info.metrics,
                "candidates": self.candidates,
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped]}


def parse_metric(text: str) -> tuple[str, str]:
    """``NAME[:min|max]`` -> (name, mode)."""
    name, sep, mode = text.rpartition(":")
    if not sep or mode not in ("min", "max"):
        name, mode = text, "min"
    if not name or any(c.isspace() for c in name):
        raise UsageError(f"bad metric {text!r}: write NAME[:min|max], e.g. val_loss or accuracy:max")
    return name, mode


def choose(root: str, metric: str, mode: str, *, verify: bool = True, quiet: bool = False,
           stage: str | None = None) -> Choice:
    """The best valid checkpoint of ``root`` by ``metric`` (see the module docstring); with ``stage``, among the
    checkpoints of that stage in ``root`` and its run directories (``store.list_runs``)."""
    if stage is None:
        infos = store.list_checkpoints(root)
    else:
        infos = [i for _, found in store.list_runs(root) for i in found if i.stage == stage]
        if not infos:
            raise NotFoundError(f"no checkpoint of stage {stage!r} in {root} or its run directories; "
                                f"`ckptd ls --tree {root}` shows the stages there")
    ranked = retention.ranked(infos, metric, mode)
    if not ranked:
        present = sorted({k for i in infos if i.valid for k in i.metrics})
        have = f"metrics present: {', '.join(present)}" if present else "no checkpoint there carries any metric"
        if not any(i.valid for i in infos):
            raise NotFoundError(f"no valid checkpoint in {root}; `ckptd ls {root}` lists what is there")
        raise NotFoundError(f"no valid checkpoint in {root} has the metric {metric!r} ({have}); attach it with "
                            f"save(metrics={{'{metric}': ...}}) or ck.report(step, {metric}=...)")
    skipped: list[tuple[str, str]] = []
    for info in ranked:
        if verify:
            with Progress("verify", info.bytes, enabled=False if quiet else None) as prog:
                checked = store.verify(info.path, progress=prog)
            if not checked.valid:
                print(f"ckptd: {info.name} ({metric}={info.metrics[metric]}) fails verification ({checked.reason}); "
                      "taking the next best", file=sys.stderr)
                skipped.append((info.name, checked.reason or "invalid"))
                continue
            info = checked
        return Choice(info, metric, mode, len(ranked), tuple(skipped))
    raise CkptdError(f"every checkpoint of {root} with the metric {metric!r} fails verification "
                     f"({len(skipped)}); `ckptd verify {root}` says why")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("best", help="name the best checkpoint by a metric",
                       description="Name the best checkpoint under DIR by a metric recorded in its manifest "
                       "(saved with it or attached later with ck.report). The best one is verified in full first; "
                       "one that fails is skipped (with a warning) for the next best. Prints the checkpoint's "
                       "path first on its line, so `ckptd best DIR --metric val_loss --path` gives just the path.")
    add_dir_argument(p, positional=True)
    p.add_argument("--metric", required=True, metavar="NAME[:min|max]", help=METRIC_HELP)
    p.add_argument("--stage", metavar="NAME", default=None,
                   help="among the checkpoints of this stage in DIR and its run directories (DIR/*/)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the full checksum verification (manifest-level check only)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--path", action="store_true", help="print only the checkpoint's path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    metric, mode = parse_metric(args.metric)
    root = existing_dir(root_from(args))
    if args.stage is not None:
        try:
            lineage.check_stage(args.stage, "--stage")
        except CkptdError as exc:
            raise UsageError(str(exc)) from None
    choice = choose(root, metric, mode, verify=not args.no_verify, quiet=args.json or args.path, stage=args.stage)
    if args.json:
        print_json(choice.as_json())
    elif args.path:
        print(choice.info.path)
    else:
        print(f"{choice.info.path}  step {choice.info.step}  {metric}={choice.value:.6g} "
              f"(best by {mode} of {choice.candidates} with {metric})  {format_metrics(choice.info.metrics)}")
    return 0
