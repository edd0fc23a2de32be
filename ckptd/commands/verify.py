"""ckptd verify [DIR|CKPT] [--json]: full checksum verification (``--remote URL``: of the object-store tier).

A checkpoint that disappears while it is verified (a running job's retention deleted it, or a restore moved
it aside) is reported as "deleted while verifying" and not counted as invalid: its bytes were never wrong.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys

from .. import exitcodes, store
from ..errors import NotFoundError
from ..progress import Progress
from . import (
    DIR_HELP,
    RootGivenError,
    UsageError,
    add_key_arguments,
    add_remote_arguments,
    default_dir,
    existing_dir,
    key_from,
    print_json,
    remote_from,
    resolve_checkpoint,
    trust_note,
)

DELETED = "deleted while verifying (removed or moved aside by another process); not counted"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="verify checksums of checkpoints",
                       description="Check every file of a checkpoint (or of every checkpoint under a directory) "
                       f"against its manifest. Exit {exitcodes.INVALID} when any is invalid. A checkpoint may be "
                       "named as in `ckptd inspect` (DIR/latest, DIR/300, or 300 with --dir).")
    p.add_argument("target", nargs="?", metavar="DIR|CKPT",
                   help="checkpoint directory or one checkpoint (default: $CKPTD_DIR, else ./checkpoints)")
    p.add_argument("--dir", dest="dir_option", metavar="DIR", default=None,
                   help=f"{DIR_HELP}; a bare step number or `latest` is looked up here")
    p.add_argument("--json", action="store_true", help="print a JSON list of results")
    add_key_arguments(p)
    add_remote_arguments(p, required=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.remote:
        return _remote(args)
    key = key_from(args)
    target, single, known = _targets(args, key)
    results: list[tuple[store.CheckpointInfo, bool]] = []
    for path, listed_bytes in target:
        if known is not None:
            info, gone = known, False
        else:
            info, gone = verify_one(path, listed_bytes, quiet=args.json, key=key)
        results.append((info, gone))
        if not args.json:
            note = trust_note(info, key) if info.valid else ""
            ok = f"ok ({note})" if note else "ok"
            print(f"{info.path}: {DELETED if gone else ok if info.valid else f'INVALID: {info.reason}'}")
    if args.json:
        print_json([{"path": i.path, "name": i.name, "step": i.step, "valid": None if gone else i.valid,
                     "deleted": gone, "reason": DELETED if gone else i.reason,
                     "keyed": i.keyed, "authenticated": i.valid and i.mac_key is not None}
                    for i, gone in results])
    if single and results and results[0][1]:
        raise NotFoundError(f"{results[0][0].path} was deleted while it was being verified")
    bad = [i for i, gone in results if not gone and not i.valid]
    if bad:
        print(f"ckptd: {len(bad)} of {len(results)} checkpoint(s) invalid", file=sys.stderr)
        return exitcodes.INVALID
    if not results and not args.json:
        print(f"no checkpoints in {single or args.target or args.dir_option or default_dir()}")
    return exitcodes.OK


def _targets(args: argparse.Namespace, key: store.Key | None
             ) -> tuple[list[tuple[str, int | None]], str | None, store.CheckpointInfo | None]:
    """([(path, bytes listed)], the single checkpoint named or None, its verification when already done)."""
    root = (args.dir_option or default_dir()) if args.target is None else None
    if root is None:
        try:
            path, verified = resolve_checkpoint(args.target, args.dir_option, missing_fix="give a checkpoint "
                                                "directory, or one checkpoint (DIR/latest, DIR/300, a path)", key=key)
            return [(path, None)], path, verified
        except RootGivenError as exc:
            root = exc.path
    existing_dir(root)
    return [(i.path, i.bytes) for i in store.list_checkpoints(root)], None, None


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _identity(st: os.stat_result | None) -> tuple[int, int] | None:
    return None if st is None else (st.st_dev, st.st_ino)


def verify_one(path: str, listed_bytes: int | None, quiet: bool,
               key: store.Key | None = None) -> tuple[store.CheckpointInfo, bool]:
    """Verify one checkpoint; the flag is True when it vanished meanwhile (then its result means nothing)."""
    name = os.path.basename(os.path.normpath(path))
    st = _lstat(path)
    if st is not None and not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        m = store.NAME_RE.match(name)
        return store.CheckpointInfo(name=name, path=path, step=int(m.group(1)) if m else -1, valid=False,
                                    reason="not a directory: a stray file named like a checkpoint; move it "
                                    "out of the checkpoint directory"), False
    total = listed_bytes if listed_bytes is not None else store.inspect_checkpoint(path).bytes
    with Progress(f"verify {name}", total, enabled=False if quiet else None) as prog:
        info = store.verify(path, progress=prog, key=key)
    after = _identity(_lstat(path))
    gone = not info.valid and (after is None or after != _identity(st))
    return info, gone


def _remote(args: argparse.Namespace) -> int:
    """``ckptd verify --remote URL``: every byte of every checkpoint of the object-store tier (those with a manifest:
    an upload without one is no checkpoint), read from the store and checked against its manifest; nothing written."""
    if args.target is not None or args.dir_option is not None:
        raise UsageError("give either DIR|CKPT (the local tier) or --remote URL (the object-store tier), not both")
    if args.key_file or os.environ.get(store.KEY_ENV):
        raise UsageError("--remote checks checksums only, not a key: `ckptd pull` the checkpoint, then `ckptd verify "
                         "--key-file FILE` it locally")
    tier = remote_from(args)
    results = []
    for rc in tier.checkpoints():
        with Progress(f"verify {rc.key}", rc.bytes, enabled=False if args.json else None) as prog:
            reason = tier.verify(rc, progress=prog)
        url = f"{tier.spec.url}/{rc.key}"
        results.append({"url": url, "key": rc.key, "name": rc.name, "step": rc.step, "valid": not reason,
                         "reason": reason})
        if not args.json:
            print(f"{url}: {f'INVALID: {reason}' if reason else 'ok'}")
    if args.json:
        print_json(results)
    bad = [r for r in results if not r["valid"]]
    if bad:
        print(f"ckptd: {len(bad)} of {len(results)} remote checkpoint(s) invalid", file=sys.stderr)
        return exitcodes.INVALID
    if not results and not args.json:
        print(f"no checkpoints on {tier.spec.url}")
    return exitcodes.OK
