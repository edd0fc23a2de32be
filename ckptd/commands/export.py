"""ckptd export CKPT -o model.safetensors: model weights only, loadable by safetensors alone."""

from __future__ import annotations

import argparse
import json
import os

from .. import store
from ..errors import CkptdError, CorruptCheckpointError
from ..progress import Progress
from . import (
    UsageError,
    add_dir_argument,
    add_key_arguments,
    best,
    default_dir,
    existing_dir,
    key_from,
    print_json,
    resolve_checkpoint,
    storage_error,
    verified,
)
from .inspect import CKPT_HELP, read_tensor_header


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export model weights to a .safetensors file",
                       description="Verify a checkpoint, then write its model weights (original parameter names) "
                       "to a standalone safetensors file, atomically.")
    p.add_argument("ckpt", metavar="CKPT", nargs="?", default=None,
                   help=CKPT_HELP + "; with --best: the checkpoint directory (default: --dir, $CKPTD_DIR, "
                   "./checkpoints)")
    p.add_argument("--best", metavar="NAME[:min|max]", default=None,
                   help="export the best checkpoint by this metric, verified (as `ckptd best`)")
    add_dir_argument(p, positional=False)
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="output file, e.g. model.safetensors")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.add_argument("--state", action="append", default=[], metavar="PATH",
                   help="also carry this JSON value of the saved state in the file's metadata, under the key PATH "
                   "(e.g. extra/model_args, user/config; repeatable); read it back with json.loads("
                   "safetensors.safe_open(FILE, 'pt').metadata()[PATH])")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: output, checkpoint, step, tensors, bytes")
    add_key_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    key = key_from(args)
    known: store.CheckpointInfo | None  # None: named, not yet verified (done below)
    if args.best is not None:
        metric, mode = best.parse_metric(args.best)
        if args.ckpt is not None and args.dir_option is not None:
            raise UsageError(f"give the directory either as DIR ({args.ckpt}) or as --dir ({args.dir_option}), "
                             "not both")
        root = existing_dir(args.ckpt or args.dir_option or default_dir())
        choice = best.choose(root, metric, mode, quiet=args.json)
        path, known = choice.info.path, choice.info
        if not args.json:
            print(f"best by {metric} ({mode}): {choice.info.name} ({metric}={choice.value:.6g})")
    elif args.ckpt is None:
        raise UsageError("name the checkpoint to export (CKPT), or pass --best METRIC to export the best one")
    else:
        path, known = resolve_checkpoint(args.ckpt, args.dir_option, key=key)
    out = os.path.abspath(args.output)
    if os.path.lexists(out) and not args.force:
        raise CkptdError(f"{out} exists; pass --force to overwrite it or choose another -o")
    if not os.path.isdir(os.path.dirname(out)):
        raise CkptdError(f"directory of {out} does not exist; create it first")
    if key is not None and known is not None and known.mac_key is None:
        known = None  # chosen by --best, which checks checksums only: authenticated here
    info = verified(path, known, key=key)
    carried = state_metadata(path, args.state)
    if info.manifest.get("sharded"):
        return _export_sharded(args, path, info, out, carried)
    header = read_tensor_header(path)  # every entry has a dtype and a shape
    tpath = os.path.join(path, store.TENSORS)
    with os.fdopen(os.open(tpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
        _, data_start = store.read_safetensors_header(f, tpath, os.fstat(f.fileno()).st_size)
        model = sorted(((k[len("model/"):], v) for k, v in header.items() if k.startswith("model/")),
                       key=lambda kv: kv[1]["data_offsets"][0])
        if not model:
            raise CkptdError(f"{path} holds no model weights (it was saved without model=)")
        entries = [(k, v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in model]
        head = store.safetensors_header_bytes(entries, {"format": "pt", "ckptd_step": str(info.step), **carried})
        total = sum(e[3] for e in entries)
        try:
            # never through a link: the output directory may be one other accounts write (store.replacing)
            with store.replacing(out, store.FILE_MODE, follow_dir=True) as dst, Progress("export", total) as prog:
                store.write_fully(dst, head)
                for _, v in model:
                    a, b = v["data_offsets"]
                    f.seek(data_start + a)
                    left = b - a
                    while left:
                        chunk = f.read(min(left, store.CHUNK))
                        if not chunk:
                            raise CorruptCheckpointError(path, f"{store.TENSORS} ends early (it changed after it "
                                                         "was verified)")
                        store.write_fully(dst, chunk)
                        left -= len(chunk)
                        prog(len(chunk))
        except OSError as exc:
            raise storage_error(exc, "export to", out) from exc
    if args.json:
        print_json({"output": out, "checkpoint": path, "step": info.step, "tensors": len(entries), "bytes": total})
    else:
        print(f"exported {len(entries)} tensors of {path} to {out}")
    return 0


STATE_TAGS = ("__t", "__np", "__npscalar", "__tuple", "__dict", "__float", "__dtype", "__device", "__bytes")


def state_metadata(path: str, wanted: list[str]) -> dict[str, str]:
    """``{PATH: JSON text}`` of each wanted value of a (verified) checkpoint's state.json; a value must be
    plain JSON (no tensors, tuples, bytes...). ``extra/NAME`` finds a plain value saved in ``extra``."""
    if not wanted:
        return {}
    raw = store.read_small(os.path.join(path, store.STATE), store.MAX_STATE_BYTES)
    tree = store.load_json(raw, path, store.STATE, store.MAX_STATE_DEPTH, store.MAX_STATE_VALUES)
    out = {}
    for want in wanted:
        node = tree
        for part in [p for p in want.split("/") if p]:
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                keys = ", ".join(sorted(node)[:20]) if isinstance(node, dict) else "none"
                raise CkptdError(f"--state {want}: the saved state has no {part!r} there (keys: {keys}); "
                                 "e.g. extra/NAME or user/KEY")
        if isinstance(node, dict) and set(node) == {"value"} and want.startswith("extra/"):
            node = node["value"]  # how a plain value in extra= is saved
        if _tagged(node):
            raise CkptdError(f"--state {want} is not plain JSON (it holds tensors, tuples, bytes or other encoded "
                             "values); carry the JSON values only, e.g. a dict of numbers and strings")
        out[want] = json.dumps(node, sort_keys=True)
    return out


def _tagged(node: object) -> bool:
    if isinstance(node, list):
        return any(_tagged(v) for v in node)
    if isinstance(node, dict):
        return (len(node) == 1 and next(iter(node)) in STATE_TAGS) or any(_tagged(v) for v in node.values())
    return False


def _export_sharded(args: argparse.Namespace, path: str, info: store.CheckpointInfo, out: str,
                    carried: dict[str, str]) -> int:
    """Consolidate a sharded (FSDP) checkpoint's model weights: every chunk of every rank's shard file
    placed into the full tensor (raw bytes; no torch needed), then one safetensors file, atomically."""
    import numpy as np

    doc = store.read_dcp_json(path)
    problem = store.dcp_problem(doc, info.manifest["files"])  # every size against the bytes that exist, first
    if problem:
        raise CorruptCheckpointError(path, f"{store.DCP_JSON} does not describe the shard files: {problem}")
    try:
        metas = {k[len("model\x1f"):]: v for k, v in doc["tensors"].items() if k.startswith("model\x1f")}
        fulls = {name: np.zeros(tuple(m["size"]), dtype=f"V{store.DTYPE_SIZES[m['dtype']]}")
                 for name, m in metas.items()}
        for (fqn, _offsets, index), fname, offset, length in doc["storage"]:
            name = fqn[len("model\x1f"):]
            if not fqn.startswith("model\x1f") or name not in fulls:
                continue
            m = metas[name]
            chunk_offsets, sizes = m["chunks"][index]
            raw = store.read_range(os.path.join(path, store.check_name(fname)), offset, length)
            part = np.frombuffer(raw, dtype=fulls[name].dtype).reshape(sizes)
            fulls[name][tuple(slice(o, o + n) for o, n in zip(chunk_offsets, sizes, strict=False))] = part
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CorruptCheckpointError(path, f"dcp.json does not describe the shard files ({exc})") from None
    if not fulls:
        raise CkptdError(f"{path} holds no model weights (it was saved without model=)")
    names = sorted(fulls)
    entries = [(n, metas[n]["dtype"], metas[n]["size"], fulls[n].nbytes) for n in names]
    head = store.safetensors_header_bytes(entries, {"format": "pt", "ckptd_step": str(info.step), **carried})
    try:
        with store.replacing(out, store.FILE_MODE, follow_dir=True) as dst:
            store.write_fully(dst, head)
            for n in names:
                store.write_fully(dst, fulls[n].tobytes())
    except OSError as exc:
        raise storage_error(exc, "export to", out) from exc
    total = sum(e[3] for e in entries)
    if args.json:
        print_json({"output": out, "checkpoint": path, "step": info.step, "tensors": len(entries), "bytes": total,
                    "consolidated_from": info.manifest.get("world_size")})
    else:
        print(f"exported {len(entries)} tensors of {path} (consolidated from {info.manifest.get('world_size')} "
              f"shards) to {out}")
    return 0

