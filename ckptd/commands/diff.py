"""ckptd diff A B [--values] [--json]: what differs between two checkpoints.

Compared: the manifest (step, kind, epoch, finished, stage, the branch point, metrics, origin: command, script,
config, world size),
the saved state's plain values (state.json: progress, scheduler, optimizer hyperparameters, extra, user;
as paths such as ``scheduler/last_epoch``), and the tensors: only in A, only in B, dtype or shape changed,
and for the rest whether their bytes are the same (xxh3-128 of each tensor's bytes). ``--values`` adds the
largest absolute difference of each changed tensor (torch reads both files; safetensors, no code runs).

Both checkpoints are verified in full first (every checksum): a diff of damaged bytes would mislead.
Sharded (FSDP) checkpoints are compared by manifest and state only.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import xxhash

from .. import store
from ..errors import CorruptCheckpointError
from . import add_dir_argument, print_json, resolve_checkpoint, verified
from .inspect import CKPT_HELP, read_tensor_header

MANIFEST_KEYS = ("step", "kind", "epoch", "finished", "stage")
SHOWN = 20  # rows of one kind printed before "... and N more" (--json lists all)
MAX_PATHS = 1000  # differing state paths collected (a state of millions of values stays bounded)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="show what differs between two checkpoints",
                       description="Compare two checkpoints: manifest (step, kind, metrics, origin: command, "
                       "config), saved state values, and tensors (added, removed, reshaped, changed or not). "
                       "Both are verified in full first.")
    p.add_argument("a", metavar="A", help=CKPT_HELP)
    p.add_argument("b", metavar="B", help="the other checkpoint, named the same way")
    add_dir_argument(p, positional=False)
    p.add_argument("--values", action="store_true",
                   help="also compute the largest absolute difference of each changed tensor (reads both in full "
                   "with torch)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _verified(target: str, dir_option: str | None, quiet: bool) -> store.CheckpointInfo:
    path, info = resolve_checkpoint(target, dir_option)
    return verified(path, info, quiet)


def _flat(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict) and node:
        for k in sorted(node):
            _flat(node[k], f"{prefix}/{k}" if prefix else str(k), out)
    else:
        out[prefix] = node


def _changes(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, _MISSING) != b.get(key, _MISSING):
            rows.append({"key": key, "a": a.get(key), "b": b.get(key), "in": "both" if key in a and key in b
                         else "a" if key in a else "b"})
            if len(rows) >= MAX_PATHS:
                break
    return rows


_MISSING = object()


def _state(info: store.CheckpointInfo) -> dict[str, Any]:
    raw = store.read_small(os.path.join(info.path, store.STATE), store.MAX_STATE_BYTES)
    tree = store.load_json(raw, info.path, store.STATE, store.MAX_STATE_DEPTH, store.MAX_STATE_VALUES)
    out: dict[str, Any] = {}
    _flat(tree, "", out)
    return out


def _tensor_digests(info: store.CheckpointInfo, header: dict[str, Any], names: list[str]) -> dict[str, str]:
    tpath = os.path.join(info.path, store.TENSORS)
    fd = os.open(tpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            _, start = store.read_safetensors_header(f, tpath, os.fstat(fd).st_size)
        out = {}
        for name in names:
            a, b = header[name]["data_offsets"]
            h, off = xxhash.xxh3_128(), start + a
            while off < start + b:
                chunk = os.pread(fd, min(store.CHUNK, start + b - off), off)
                if not chunk:
                    raise CorruptCheckpointError(info.path,
                                                 f"{store.TENSORS} ends early (changed after it was verified)")
                h.update(chunk)
                off += len(chunk)
            out[name] = h.hexdigest()
        return out
    finally:
        os.close(fd)


def _max_abs(a: store.CheckpointInfo, b: store.CheckpointInfo, names: list[str]) -> dict[str, float]:
    import torch  # only here: the rest of the command line does not need it
    from safetensors import safe_open

    out: dict[str, float] = {}
    fds = [os.open(os.path.join(i.path, store.TENSORS), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC) for i in (a, b)]
    try:  # safetensors opens by name: give it the files already opened without following a link
        with safe_open(f"/proc/self/fd/{fds[0]}", "pt") as fa, safe_open(f"/proc/self/fd/{fds[1]}", "pt") as fb:
            for name in names:
                ta, tb = fa.get_tensor(name), fb.get_tensor(name)
                wide = torch.float64 if ta.is_floating_point() or ta.dtype == torch.bool else torch.int64
                if ta.is_complex():
                    d = (ta.to(torch.complex128) - tb.to(torch.complex128)).abs()
                else:
                    d = (ta.to(wide) - tb.to(wide)).abs().to(torch.float64)
                out[name] = float(d.max()) if d.numel() else 0.0
    finally:
        for fd in fds:
            os.close(fd)
    return out


def _tensors(a: store.CheckpointInfo, b: store.CheckpointInfo, values: bool) -> dict[str, Any]:
    if a.manifest.get("sharded") or b.manifest.get("sharded"):
        return {"compared": False, "why": "sharded checkpoints: tensors are not compared (manifest and state are)"}
    ha, hb = read_tensor_header(a.path), read_tensor_header(b.path)
    common = sorted(set(ha) & set(hb))
    reshaped = [n for n in common if (ha[n]["dtype"], ha[n]["shape"]) != (hb[n]["dtype"], hb[n]["shape"])]
    same_layout = [n for n in common if n not in set(reshaped)]
    da, db = _tensor_digests(a, ha, same_layout), _tensor_digests(b, hb, same_layout)
    changed = [n for n in same_layout if da[n] != db[n]]
    out: dict[str, Any] = {
        "compared": True,
        "only_a": sorted(set(ha) - set(hb)), "only_b": sorted(set(hb) - set(ha)),
        "reshaped": [{"name": n, "a": [ha[n]["dtype"], ha[n]["shape"]], "b": [hb[n]["dtype"], hb[n]["shape"]]}
                     for n in reshaped],
        "changed": changed, "same": len(same_layout) - len(changed),
    }
    if values:
        out["max_abs_diff"] = _max_abs(a, b, changed)
    return out


def compare(a: store.CheckpointInfo, b: store.CheckpointInfo, values: bool = False) -> dict[str, Any]:
    ma = {k: a.manifest.get(k) for k in MANIFEST_KEYS} | {"branched_from": _branch_point(a)}
    mb = {k: b.manifest.get(k) for k in MANIFEST_KEYS} | {"branched_from": _branch_point(b)}
    oa: dict[str, Any] = {}
    ob: dict[str, Any] = {}
    _flat(a.origin or {}, "", oa)
    _flat(b.origin or {}, "", ob)
    return {
        "a": a.path, "b": b.path,
        "manifest": _changes(ma, mb),
        "metrics": _changes(a.metrics, b.metrics),
        "origin": _changes(oa, ob),
        "state": _changes(_state(a), _state(b)),
        "tensors": _tensors(a, b, values),
    }


def _branch_point(info: store.CheckpointInfo) -> str | None:
    """The checkpoint the run that wrote ``info`` branched from (its lineage's newest hop), or None."""
    hops = (info.lineage or {}).get("hops")
    return os.path.join(hops[0]["dir"], hops[0]["name"]) if hops else None


def _short(v: Any) -> str:
    text = repr(v) if not isinstance(v, str) else v
    return text if len(text) <= 60 else text[:57] + "..."


def _print(d: dict[str, Any]) -> None:
    print(f"A: {d['a']}\nB: {d['b']}")
    same = True
    for section in ("manifest", "metrics", "origin", "state"):
        rows = d[section]
        if not rows:
            continue
        same = False
        print(f"{section}:")
        for r in rows[:SHOWN]:
            a = "(absent)" if r["in"] == "b" else _short(r["a"])
            b = "(absent)" if r["in"] == "a" else _short(r["b"])
            print(f"  {r['key']}: {a} -> {b}")
        if len(rows) > SHOWN:
            print(f"  ... and {len(rows) - SHOWN} more (--json lists them all)")
    t = d["tensors"]
    if not t["compared"]:
        print(f"tensors: {t['why']}")
        return
    n_changed = len(t["changed"])
    print(f"tensors: {n_changed} changed, {t['same']} the same, {len(t['only_a'])} only in A, "
          f"{len(t['only_b'])} only in B, {len(t['reshaped'])} of another dtype or shape")
    for label, names in (("only in A", t["only_a"]), ("only in B", t["only_b"])):
        for n in names[:SHOWN]:
            print(f"  {label}: {n}")
    for r in t["reshaped"][:SHOWN]:
        print(f"  reshaped: {r['name']}: {r['a'][0]}{r['a'][1]} -> {r['b'][0]}{r['b'][1]}")
    for n in t["changed"][:SHOWN]:
        extra = f"  max|A-B|={t['max_abs_diff'][n]:.6g}" if "max_abs_diff" in t else ""
        print(f"  changed: {n}{extra}")
    if max(n_changed, len(t["only_a"]), len(t["only_b"]), len(t["reshaped"])) > SHOWN:
        print("  ... (--json lists every tensor)")
    if same and not (n_changed or t["only_a"] or t["only_b"] or t["reshaped"]):
        print("the same state (only names, times or sizes of files may differ)")


def run(args: argparse.Namespace) -> int:
    a = _verified(args.a, args.dir_option, args.json)
    b = _verified(args.b, args.dir_option, args.json)
    d = compare(a, b, values=args.values)
    if args.json:
        print_json(d)
    else:
        _print(d)
    return 0
