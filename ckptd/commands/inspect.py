"""ckptd inspect CKPT [--json]: tensors, other state keys, manifest; ``--remote URL``: of a checkpoint of the
object-store tier (its manifest, the tensor file's header and state.json are read; no tensor data).

A sharded (FSDP/DTensor) checkpoint's tensors are listed from its ``dcp.json``: the tensor map that
ckptd/sharded.py writes as JSON (never pickled, so nothing here executes code from the checkpoint),
one logical tensor per entry with its global shape, its chunks and the rank files that hold them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from typing import Any, BinaryIO

from .. import store
from ..errors import CorruptCheckpointError, NotFoundError
from . import (
    LATEST,
    UsageError,
    add_dir_argument,
    add_key_arguments,
    add_remote_arguments,
    human_bytes,
    is_step_number,
    key_from,
    print_json,
    remote_from,
    resolve_checkpoint,
    trust_note,
)

CKPT_HELP = ("one checkpoint: a path (checkpoints/step-000000000300), DIR/latest (the newest valid one), DIR/300 "
             "(a step number), or 300 / latest / step-000000000300 looked up in --dir")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show what a checkpoint holds",
                       description="Show a checkpoint's tensors (name, shape, dtype), its other state keys and "
                       "its manifest. Reads headers only; use `ckptd verify` for checksums. With a key, the "
                       "manifest must authenticate, and state.json and dcp.json, which it reads whole, too; the tensor "
                       "data is authenticated by `ckptd verify --key-file`.")
    p.add_argument("ckpt", metavar="CKPT", help=CKPT_HELP)
    add_dir_argument(p, positional=False)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_key_arguments(p)
    add_remote_arguments(p, required=False)
    p.set_defaults(func=run)


def read_tensor_header(path: str) -> dict[str, Any]:
    """The tensor file's header entries, each checked to carry a dtype and a shape (no ``__metadata__``)."""
    tpath = os.path.join(path, store.TENSORS)
    try:
        with open(tpath, "rb") as f:
            return tensor_header(f, tpath, os.fstat(f.fileno()).st_size, path)
    except OSError as exc:
        raise CorruptCheckpointError(path, f"{store.TENSORS} unreadable: {exc.strerror}") from None


def tensor_header(f: BinaryIO, tpath: str, size: int, path: str) -> dict[str, Any]:
    """:func:`read_tensor_header` of a tensor file of ``size`` bytes open as ``f`` (at offset 0)."""
    header, _ = store.read_safetensors_header(f, tpath, size)
    header.pop("__metadata__", None)
    for key, meta in header.items():
        dtype, shape = meta.get("dtype"), meta.get("shape")
        if not isinstance(dtype, str) or not isinstance(shape, list) or \
                not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise CorruptCheckpointError(path, f"{store.TENSORS}: tensor {key!r} lacks a valid dtype or shape "
                                         "(damaged or crafted header)")
    return header


def _dims(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= store.MAX_DIMS and \
        all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v)


def read_shard_map(path: str, manifest: dict[str, Any], info: store.CheckpointInfo | None = None
                   ) -> dict[str, dict[str, Any]]:
    """The logical tensors of a sharded checkpoint, from its ``dcp.json`` (JSON, read within bounds and
    every field's type checked): ``{name: {dtype, shape, shards, files, ranks, bytes}}``, ``name`` the
    flattened path with ``/`` (``model/0.weight``, ``optimizer/state/0.weight/exp_avg``), ``bytes``
    what the shard files hold of it."""
    try:
        if info is not None and info.mac_key is not None and store.DCP_JSON in manifest["files"]:
            authenticate_small(info, store.DCP_JSON,
                               store.read_small(os.path.join(path, store.DCP_JSON), store.MAX_DCP_JSON_BYTES))
        doc = store.read_dcp_json(path)
    except FileNotFoundError:
        raise CorruptCheckpointError(path, f"{store.DCP_JSON} is missing (a sharded checkpoint needs its tensor map)") \
            from None
    except OSError as exc:
        raise CorruptCheckpointError(path, f"{store.DCP_JSON} unreadable: {exc.strerror}") from None
    return shard_map(doc, path, manifest)


def shard_map(doc: Any, path: str, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """:func:`read_shard_map` of a parsed ``dcp.json``."""
    bad = f"{store.DCP_JSON} does not describe the shard files"
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), dict) or \
            not isinstance(doc.get("storage"), list):
        raise CorruptCheckpointError(path, f"{bad} (no tensors/storage)")
    out: dict[str, dict[str, Any]] = {}
    for fqn, m in doc["tensors"].items():
        if not (isinstance(m, dict) and m.get("dtype") in store.DTYPE_SIZES and _dims(m.get("size"))
                and isinstance(m.get("chunks"), list)):
            raise CorruptCheckpointError(path, f"{bad} (tensor {fqn!r} lacks a valid dtype, size or chunks)")
        out[fqn] = {"dtype": m["dtype"], "shape": m["size"], "shards": len(m["chunks"]), "files": [], "ranks": [],
                    "bytes": 0}
    for entry in doc["storage"]:
        ok = isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], list) and len(entry[0]) == 3
        fields: Any = entry if ok else (None, None, None, None)
        fqn, fname, offset, length = fields
        if not (ok and isinstance(fqn[0], str) and fqn[0] in out and isinstance(fname, str)
                and fname in manifest["files"] and _dims([offset, length])
                and offset + length <= manifest["files"][fname]["bytes"]):
            raise CorruptCheckpointError(path, f"{bad} (storage entry {str(entry)[:80]} is not a chunk of a "
                                         "listed tensor in a listed file)")
        rec = out[fqn[0]]
        rec["bytes"] += length
        if fname not in rec["files"]:
            rec["files"].append(fname)
            m = store.SHARD_FILE_RE.match(fname)
            if m:
                rec["ranks"].append(int(m.group(1)))
    for rec in out.values():
        rec["files"].sort()
        rec["ranks"].sort()
    return {fqn.replace(store.SHARD_SEP, "/"): rec for fqn, rec in out.items()}


def _ranges(ranks: list[int]) -> str:
    """0,1,2,5 -> "0-2,5"."""
    parts: list[list[int]] = []
    for r in ranks:
        if parts and parts[-1][1] == r - 1:
            parts[-1][1] = r
        else:
            parts.append([r, r])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts) or "-"


def _drop_shard_refs(tree: Any) -> Any:
    """The state tree without the sharded tensors' references (listed as tensors instead)."""
    if isinstance(tree, dict):
        if set(tree) == {"__shard"}:
            return None
        kept = {k: _drop_shard_refs(v) for k, v in tree.items()}
        kept = {k: v for k, v in kept.items() if v is not None or tree[k] is None}
        return kept if kept or not tree else None  # emptied by the removal: gone too
    return tree


def authenticate_small(info: store.CheckpointInfo, fname: str, raw: bytes) -> None:
    """With the checkpoint's key: a file read whole must carry its MAC (and checksum) (CorruptCheckpointError)."""
    if info.mac_key is None:
        return
    h = store.Hashes(info.mac_key)
    h.update(raw)
    problem = store.record_problem(fname, info.manifest["files"][fname], len(raw), h)
    if problem:
        raise CorruptCheckpointError(info.path, problem)


def read_state_tree(path: str, info: store.CheckpointInfo | None = None) -> Any:
    spath = os.path.join(path, store.STATE)
    try:
        raw = store.read_small(spath, store.MAX_STATE_BYTES)
    except OSError as exc:
        raise CorruptCheckpointError(path, f"{store.STATE} unreadable: {exc.strerror}") from None
    if info is not None and store.STATE in info.manifest["files"]:
        authenticate_small(info, store.STATE, raw)
    return state_tree(raw, path)


def state_tree(raw: bytes, path: str) -> Any:
    # the same bounds as restore: a hostile state.json costs neither time nor memory
    return store.load_json(raw, path, store.STATE, store.MAX_STATE_DEPTH, store.MAX_STATE_VALUES)


def state_outline(tree: Any, prefix: str = "", out: list[str] | None = None, depth: int = 0) -> list[str]:
    """Non-tensor leaves and containers of the state tree, as path = value lines."""
    out = [] if out is None else out
    if isinstance(tree, dict) and len(tree) == 1 and next(iter(tree)).startswith("__"):
        tag, val = next(iter(tree.items()))
        if tag not in ("__t", "__np"):
            out.append(f"{prefix} = {json.dumps(val)[:80]}")
        return out
    if isinstance(tree, dict) and depth < 4:
        for k, v in tree.items():
            state_outline(v, f"{prefix}/{k}" if prefix else k, out, depth + 1)
    elif isinstance(tree, list) and depth < 4 and len(tree) <= 16:
        for i, v in enumerate(tree):
            state_outline(v, f"{prefix}/{i}", out, depth + 1)
    else:
        out.append(f"{prefix} = {json.dumps(tree)[:80]}")
    return out


_TENSOR_TAGS = ("__t", "__np")


def _holds_tensor(tree: Any) -> bool:
    if isinstance(tree, dict):
        return (len(tree) == 1 and next(iter(tree)) in _TENSOR_TAGS) or any(_holds_tensor(v) for v in tree.values())
    return isinstance(tree, list) and any(_holds_tensor(v) for v in tree)


def state_values(tree: Any, prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """``--json``: the non-tensor state as ``{path: value}``, each value the JSON of state.json (whole: no
    outline cut); tensors are under ``tensors``. Other tagged values keep their tag (``{"__tuple": [...]}``,
    ``{"__float": "nan"}``: docs/format.md)."""
    out = {} if out is None else out
    if isinstance(tree, dict) and len(tree) == 1 and next(iter(tree)).startswith("__"):
        if next(iter(tree)) not in _TENSOR_TAGS:
            out[prefix] = tree
    elif isinstance(tree, dict) and tree:
        for k, v in tree.items():
            state_values(v, f"{prefix}/{k}" if prefix else k, out)
    elif isinstance(tree, list) and _holds_tensor(tree):
        for i, v in enumerate(tree):
            state_values(v, f"{prefix}/{i}", out)
    else:
        out[prefix] = tree
    return out


def run(args: argparse.Namespace) -> int:
    if args.remote:
        return _remote(args)
    key = key_from(args)
    path, verified = resolve_checkpoint(args.ckpt, args.dir_option, key=key)
    info = verified or store.inspect_checkpoint(path, key)
    if not info.valid:
        raise CorruptCheckpointError(path, info.reason)
    tensors = read_tensor_header(path)
    tree = read_state_tree(path, info)
    sharded = bool(info.manifest.get("sharded"))
    shards = read_shard_map(path, info.manifest, info) if sharded else {}
    note = trust_note(info, key)
    if info.mac_key is not None and verified is None:
        note = "manifest and state authenticated; tensor data not read (ckptd verify --key-file checks every byte)"
    return _show(args, info, tensors, tree, shards, note)


def _remote(args: argparse.Namespace) -> int:
    """``ckptd inspect --remote URL CKPT``: CKPT is ``latest``, a step number, a checkpoint name or an upload's key;
    the manifest (checked as ``ls --remote`` does), the tensor header (a ranged read) and state.json are read."""
    if args.dir_option is not None:
        raise UsageError("give either --dir (the local tier) or --remote URL (the object-store tier), not both")
    if args.key_file or os.environ.get(store.KEY_ENV):
        raise UsageError("--remote does not authenticate with a key: `ckptd pull` the checkpoint, then `ckptd "
                         "inspect --key-file FILE` it locally")
    if args.ckpt != LATEST and not is_step_number(args.ckpt) and not store.NAME_RE.match(args.ckpt) \
            and not remote_key(args.ckpt):
        raise UsageError(f"bad checkpoint {args.ckpt!r} for --remote: write latest, a step number, "
                         "step-000000000300, or an upload's key (`ckptd ls --remote` lists them)")
    tier = remote_from(args)
    listed = tier.checkpoints()
    named = [c for c in listed if args.ckpt in (c.key, c.name) or (is_step_number(args.ckpt) and
                                                                   c.step == int(args.ckpt))]
    if args.ckpt == LATEST:
        named = [c for c in listed if c.valid][-1:]
    if not named:
        raise NotFoundError(f"no checkpoint {args.ckpt} on {tier.spec.url}; `ckptd ls --remote {tier.spec.url}` "
                            "lists what is there")
    rc = named[-1]  # of two uploads of one step, the newer
    where = f"{tier.spec.url}/{rc.key}"
    if not rc.valid:
        raise CorruptCheckpointError(where, rc.reason)
    files = rc.manifest["files"]
    tsize = files[store.TENSORS]["bytes"] if store.TENSORS in files else 0
    head = tier.read(rc, store.TENSORS, 0, min(8, tsize))
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    body = tier.read(rc, store.TENSORS, 8, 8 + n) if len(head) == 8 and n <= store.MAX_HEADER_BYTES \
        and 8 + n <= tsize else b""
    tensors = tensor_header(io.BytesIO(head + body), f"{where}/{store.TENSORS}", tsize, where)
    ssize = files[store.STATE]["bytes"] if store.STATE in files else 0
    if ssize > store.MAX_STATE_BYTES:
        raise CorruptCheckpointError(where, f"{store.STATE} is {ssize} bytes (at most {store.MAX_STATE_BYTES})")
    tree = state_tree(tier.read(rc, store.STATE, 0, ssize), where)
    info = store.CheckpointInfo(name=rc.key, path=where, step=rc.step, kind=rc.kind, created=rc.created,
                                bytes=rc.bytes, metrics=rc.metrics, manifest=rc.manifest)
    shards: dict[str, dict[str, Any]] = {}
    if info.manifest.get("sharded"):
        dsize = files[store.DCP_JSON]["bytes"] if store.DCP_JSON in files else 0
        if dsize > store.MAX_DCP_JSON_BYTES:
            raise CorruptCheckpointError(where, f"{store.DCP_JSON} is {dsize} bytes (at most "
                                         f"{store.MAX_DCP_JSON_BYTES})")
        doc = store.load_json(tier.read(rc, store.DCP_JSON, 0, dsize), where, store.DCP_JSON, 8,
                              store.MAX_DCP_JSON_BYTES)
        shards = shard_map(doc, where, info.manifest)
    return _show(args, info, tensors, tree, shards, "remote tier: manifest checked; no data read (ckptd verify "
                 "--remote checks every byte)")


def remote_key(text: str) -> bool:
    from ..remote import KEY_RE

    return bool(KEY_RE.match(text))


def _show(args: argparse.Namespace, info: store.CheckpointInfo, tensors: dict[str, Any], tree: Any,
          shards: dict[str, dict[str, Any]], note: str) -> int:
    sharded = bool(info.manifest.get("sharded"))
    if sharded:
        tree = _drop_shard_refs(tree)
    if args.json:
        out = {"manifest": info.manifest, "tensors": {k: {"dtype": v["dtype"], "shape": v["shape"]}
                                                      for k, v in tensors.items()},
               "state": state_values(tree)}
        if sharded:
            out["sharded_tensors"] = shards
        print_json(out)
        return 0
    print(f"checkpoint {info.path}")
    if note:
        print(f"  {note}")
    print(f"  step {info.step}  kind {info.kind}  epoch {info.epoch}  size {human_bytes(info.bytes)}"
          + (f"  sharded over {info.manifest.get('world_size')} ranks" if sharded else ""))
    if sharded:
        width = max([40, *(len(k) for k in shards)])
        print(f"\nsharded tensors ({len(shards)}, from {store.DCP_JSON}; global shapes):")
        print(f"  {'NAME':<{width}} {'DTYPE':<5} {'SHAPE':<16} {'SHARDS':>6}  {'RANKS':<8} BYTES")
        for k, v in shards.items():
            print(f"  {k:<{width}} {v['dtype']:<5} {str(v['shape']):<16} {v['shards']:>6}  "
                  f"{_ranges(v['ranks']):<8} {human_bytes(v['bytes'])}")
    print(f"\n{'replicated tensors' if sharded else 'tensors'} ({len(tensors)}):")
    for k, v in tensors.items():
        print(f"  {k:<60} {v['dtype']:<5} {v['shape']}")
    print("\nother state:")
    for line in state_outline(tree):
        print(f"  {line}")
    print("\nmanifest:")
    print(json.dumps(info.manifest, indent=1, sort_keys=True))
    return 0
