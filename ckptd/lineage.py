"""Where a run came from: its stage and the checkpoints it branched from, recorded in every manifest.

Two manifest fields (checked by ``store`` with the rest of the manifest, so they are part of its digest):

  * ``stage``: the run's stage name (``Checkpointer(stage="sft")``, ``ckptd run --stage sft``), or None;
  * ``lineage``: None for a run that started from nothing, else ``{"hops": [...], "truncated": bool}``,
    newest hop first. Hop 0 is this run's branch point, hop 1 that run's branch point, and so on back to
    the first run. Each hop: ``dir`` (the parent run's directory, absolute), ``name`` and ``step`` (the
    parent checkpoint), ``digest`` (its manifest's digest when it was restored), ``files_digest`` (of its
    file list: names and checksums, which metrics added later leave alone), ``stage`` (the parent's),
    ``run_id``, ``parts`` (what this run restored from it) and ``changed`` (what differs from the run that
    wrote it: command, script, config, stage, optimizer hyperparameters; short phrases).

A branch copies its parent's hops after its own, so the whole chain is in every checkpoint's manifest: a
parent deleted later is still described, and showing a lineage never needs to open another directory.
Bounds (a hostile record is refused as an invalid manifest): at most ``MAX_HOPS`` hops (older ones are
dropped and ``truncated`` set), ``MAX_CHANGED`` phrases of ``MAX_PHRASE`` characters per hop, paths of
``MAX_PATH`` characters. Nothing here imports torch or the store.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .errors import CkptdError

MAX_HOPS = 64
MAX_CHANGED = 32
MAX_PHRASE = 300
MAX_PATH = 4096
# What restore(parts=...) can take from a checkpoint; None (all) is every one of them.
PARTS = ("model", "optimizer", "scheduler", "scaler", "extra", "user", "rng", "progress")
STAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NAME_RE = re.compile(r"^step-([0-9]{12,20})$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HOP_KEYS = {"dir", "name", "step", "digest", "files_digest", "stage", "run_id", "parts", "changed"}


def check_stage(stage: Any, who: str = "stage") -> str | None:
    """A stage name as given by the user: None, or a short plain word (CkptdError naming the fix otherwise)."""
    if stage is None:
        return None
    if not isinstance(stage, str) or not STAGE_RE.match(stage):
        raise CkptdError(f"{who} {stage!r} is not a stage name: use up to 64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit (e.g. sft, rl, distill-2)")
    return stage


def check_parts(parts: Any) -> tuple[str, ...]:
    """``restore(parts=...)``: None means every part; else a non-empty collection of names from PARTS."""
    if parts is None:
        return PARTS
    if isinstance(parts, str):
        parts = [p for p in parts.split(",") if p]
    try:
        chosen = tuple(dict.fromkeys(parts))
    except TypeError:
        chosen = ()
    unknown = [p for p in chosen if p not in PARTS]
    if not chosen or unknown:
        raise CkptdError(f"parts {parts!r} names {'nothing' if not unknown else ', '.join(map(repr, unknown))}: "
                         f"choose from {', '.join(PARTS)} (e.g. parts=('model',) for the weights only)")
    return tuple(p for p in PARTS if p in chosen)


def hop(parent_dir: str, manifest: dict[str, Any], name: str, files_digest: str, parts: tuple[str, ...],
        changed: list[str]) -> dict[str, Any]:
    """The record of one branch point: ``manifest`` is the parent checkpoint's (checked, with its digest)."""
    return {"dir": os.path.abspath(parent_dir)[:MAX_PATH], "name": name, "step": manifest["step"],
            "digest": manifest.get("digest"), "files_digest": files_digest,
            "stage": manifest.get("stage"), "run_id": str(manifest.get("run_id", ""))[:128],
            "parts": list(parts), "changed": [p[:MAX_PHRASE] for p in changed[:MAX_CHANGED]]}


def extend(new_hop: dict[str, Any], parent_lineage: Any) -> dict[str, Any]:
    """This run's lineage: its branch point, then the parent's own hops (at most MAX_HOPS in all)."""
    older = parent_lineage.get("hops", []) if isinstance(parent_lineage, dict) else []
    hops = [new_hop, *older]
    truncated = bool(isinstance(parent_lineage, dict) and parent_lineage.get("truncated")) or len(hops) > MAX_HOPS
    return {"hops": hops[:MAX_HOPS], "truncated": truncated}


def with_changes(lineage: dict[str, Any] | None, phrases: list[str]) -> dict[str, Any] | None:
    """``lineage`` with ``phrases`` added to its newest hop's ``changed`` (once each, within bounds)."""
    if not lineage or not lineage.get("hops") or not phrases:
        return lineage
    first = dict(lineage["hops"][0])
    changed = list(first.get("changed") or [])
    for p in phrases:
        if p[:MAX_PHRASE] not in changed and len(changed) < MAX_CHANGED:
            changed.append(p[:MAX_PHRASE])
    first["changed"] = changed
    return {**lineage, "hops": [first, *lineage["hops"][1:]]}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _hop_problem(h: Any, i: int) -> str:
    if not isinstance(h, dict) or set(h) != _HOP_KEYS:
        return f"hop {i} is not an object of exactly {', '.join(sorted(_HOP_KEYS))}"
    d = h["dir"]
    if not isinstance(d, str) or not d.startswith("/") or len(d) > MAX_PATH or "\x00" in d:
        return f"hop {i} dir is not an absolute path of at most {MAX_PATH} characters"
    if not isinstance(h["name"], str) or not _NAME_RE.match(h["name"]):
        return f"hop {i} name is not a checkpoint name"
    if not _is_int(h["step"]) or not 0 <= h["step"] < 10**20:
        return f"hop {i} step is not a non-negative integer"
    for k in ("digest", "files_digest"):
        if h[k] is not None and not (isinstance(h[k], str) and _HEX32.match(h[k])):
            return f"hop {i} {k} is not a digest"
    if h["stage"] is not None and not (isinstance(h["stage"], str) and STAGE_RE.match(h["stage"])):
        return f"hop {i} stage is not a stage name"
    if not isinstance(h["run_id"], str) or len(h["run_id"]) > 128:
        return f"hop {i} run_id is not a short string"
    if not isinstance(h["parts"], list) or not h["parts"] or not all(p in PARTS for p in h["parts"]):
        return f"hop {i} parts is not a list of {', '.join(PARTS)}"
    ch = h["changed"]
    if not isinstance(ch, list) or len(ch) > MAX_CHANGED or \
            not all(isinstance(p, str) and len(p) <= MAX_PHRASE for p in ch):
        return f"hop {i} changed is not a list of at most {MAX_CHANGED} phrases of {MAX_PHRASE} characters"
    return ""


def problem(lineage: Any) -> str:
    """The first wrong part of a recorded lineage ("" when it is well formed and within bounds)."""
    if lineage is None:
        return ""
    if not isinstance(lineage, dict) or set(lineage) != {"hops", "truncated"}:
        return "is not an object of hops and truncated"
    hops = lineage["hops"]
    if not isinstance(hops, list) or not hops or len(hops) > MAX_HOPS:
        return f"hops is not a list of 1 to {MAX_HOPS} branch points"
    if not isinstance(lineage["truncated"], bool):
        return "truncated is not true or false"
    for i, h in enumerate(hops):
        why = _hop_problem(h, i)
        if why:
            return why
    return ""


def stage_problem(stage: Any) -> str:
    if stage is None or (isinstance(stage, str) and STAGE_RE.match(stage)):
        return ""
    return "is not a stage name (letters, digits, '.', '_', '-'; at most 64)"


def hyperparameter_changes(before: Any, after: Any) -> list[str]:
    """What differs between two optimizers' ``param_groups`` hyperparameters (``params`` left out), e.g.
    ``optimizer lr 0.01 -> 0.001`` (``group 1 lr ...`` when groups differ from each other)."""
    if not isinstance(before, list) or not isinstance(after, list):
        return []
    out: list[str] = []
    many = len(after) > 1
    for i, (old, new) in enumerate(zip(before, after, strict=False)):
        if not isinstance(old, dict) or not isinstance(new, dict):
            continue
        for key in sorted(set(old) | set(new)):
            if key == "params":
                continue
            a, b = old.get(key), new.get(key)
            if a != b and _plain(a) and _plain(b):
                out.append(f"optimizer {f'group {i} ' if many else ''}{key} {a!r} -> {b!r}")
    if len(before) != len(after):
        out.append(f"optimizer param groups {len(before)} -> {len(after)}")
    return out[:MAX_CHANGED]


def _plain(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return len(v) <= 8 and all(_plain(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str)) and len(str(v)) <= 64
