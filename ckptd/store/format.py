"""What the bytes of a checkpoint mean, and the bounds a reader holds them to.

The manifest (fields, digest, encoding), the JSON bounds every metadata file is checked against before
it is parsed, a sharded checkpoint's ``dcp.json``, and the safetensors header of ``tensors.safetensors``
(parsed and built). Pure functions of bytes and parsed values: no file is opened here (a header is read
from a file object the caller opened), so the writer, the catalog and the reader share one definition.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeGuard

import xxhash

from .. import lineage, origin
from ..errors import CorruptCheckpointError
from .auth import ALG, MAC_FIELD, Key
from .layout import FILE_RE, MANIFEST, SHARD_FILE_RE

FORMAT = "ckptd/1"
KINDS = ("periodic", "emergency", "manual", "final")
HASH = "xxh3_128"
SHARD_SEP = "\x1f"  # joins the path of a flattened value in dcp.json (FQNs hold dots)
ALIGN = 4096  # O_DIRECT alignment of file offsets, lengths and memory; the tensor data section starts here

# Bounds on what a checkpoint's metadata may hold (README, "On-disk format"): what real checkpoints
# need, with wide headroom, so a damaged or hostile file is refused before it can cost much memory.
MAX_MANIFEST_BYTES = 16 << 20
MAX_MANIFEST_DEPTH = 16  # real: 3 (manifest / metrics / value)
MAX_HEADER_BYTES = 100 << 20  # bound on a safetensors JSON header we are willing to parse
MAX_TENSORS = 500_000  # header entries; ~550 B of Python objects each once parsed (real: thousands)
MAX_DIMS = 64
MAX_KEY_CHARS = 4096
MAX_STATE_BYTES = 256 << 20  # bound on state.json
MAX_STATE_VALUES = 4_000_000  # JSON values in state.json (~50-100 B of Python objects each)
MAX_STATE_DEPTH = 100  # nesting of state.json (real: ~10)
MAX_DCP_JSON_BYTES = 256 << 20


# ----------------------------------------------------------------------------- checksums and the manifest


def new_hasher() -> Any:
    return xxhash.xxh3_128()


def digest_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


class Hashes:
    """A file's xxh3-128 and, with a key, its keyed BLAKE3 (MAC), fed the same bytes in one pass: whoever reads
    or writes the file once hashes it for both. ``hexdigest()`` is the xxh3, ``mac()`` the MAC (None without a
    key)."""

    def __init__(self, key: Key | None = None) -> None:
        self._xxh = new_hasher()
        self._mac = key.file_hasher() if key is not None else None

    def update(self, data: Any) -> None:
        self._xxh.update(data)
        if self._mac is not None:
            self._mac.update(data)

    def hexdigest(self) -> str:
        return self._xxh.hexdigest()

    def mac(self) -> str | None:
        return self._mac.hexdigest() if self._mac is not None else None


def record_problem(fname: str, rec: dict[str, Any], size: int, hashes: Hashes) -> str:
    """Why a file read as ``size`` bytes hashed into ``hashes`` is not the one its manifest record lists
    (``""`` when it is): its size, its checksum, and with a key its MAC."""
    if size != rec["bytes"]:
        return f"{fname} is {size} bytes, manifest says {rec['bytes']}"
    if hashes.hexdigest() != rec.get(HASH):
        return f"{fname} checksum mismatch (content altered or corrupted)"
    mac = hashes.mac()
    if mac is not None and mac != rec.get(MAC_FIELD):
        return f"{fname} does not authenticate with this key (keyed BLAKE3 mismatch: altered without the key)"
    return ""


def manifest_canonical(manifest: dict[str, Any]) -> bytes:
    """What the manifest's MAC covers: every field but ``digest`` and the MAC itself, canonically encoded, so
    adding, removing or changing any field, file or record changes these bytes."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    if isinstance(body.get("auth"), dict):
        body["auth"] = {k: v for k, v in body["auth"].items() if k != "mac"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sign_manifest(manifest: dict[str, Any], key: Key) -> None:
    """Set the manifest's ``auth`` (alg, key id, MAC); every file record must already carry its MAC."""
    manifest["auth"] = {"alg": ALG, "key_id": key.id}
    manifest["auth"]["mac"] = key.manifest_mac(manifest_canonical(manifest))


def authentication_problem(m: dict[str, Any], key: Key) -> str:
    """Why a parsed, checked manifest does not authenticate with ``key`` (``""`` when it does, or when it was
    written without a key and ``key.allow_unkeyed``)."""
    auth = m.get("auth")
    if auth is None:
        if key.allow_unkeyed:
            return ""
        return ("is not authenticated: it was written without a key (or its MAC was stripped); a run with a key "
                "refuses it unless unkeyed checkpoints are allowed (allow_unkeyed / --allow-unkeyed)")
    if auth["key_id"] != key.id:
        return (f"was authenticated with another key (key id {auth['key_id']}, this key {key.id}); "
                "give the key it was written with")
    if not all(MAC_FIELD in rec for rec in m["files"].values()):
        return "does not authenticate: a file record lacks its MAC"
    try:
        canonical = manifest_canonical(m)
    except (TypeError, ValueError):
        return "does not authenticate: it cannot be encoded canonically"
    if key.manifest_mac(canonical) != auth["mac"]:
        return "does not authenticate with this key (MAC mismatch: altered by someone without the key)"
    return ""


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The manifest's own digest: of every field but ``digest``, canonically encoded."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return xxhash.xxh3_128_hexdigest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def files_digest(manifest: dict[str, Any]) -> str:
    """A digest of a manifest's file list (names, sizes, checksums): the checkpoint's data, which metrics added
    to the manifest later (``ck.report``, ``add_metrics``, ``finished``) leave as it is."""
    return xxhash.xxh3_128_hexdigest(json.dumps(manifest.get("files", {}), sort_keys=True,
                                                separators=(",", ":")).encode())


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    """The bytes of ``manifest.json`` (its digest already set)."""
    return json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False).encode()


# ----------------------------------------------------------------------------- bounded JSON


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_PAIR = re.compile(rb"\[\]|\{\}")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def json_bounds_problem(raw: bytes, max_depth: int, max_values: int) -> str:
    """Why ``raw`` is too deep or holds too many values to parse (``""`` when within bounds).

    A cheap scan (C-speed regex and bytes methods) before ``json.loads``: parsing a deeply nested
    document overflows the stack, and a document of many tiny values (``[[],[],...]``) costs 20-50x
    its size in Python objects. Counts are upper bounds (separators inside strings are not counted;
    values are counted by their separators).
    """
    bare = _JSON_STRING.sub(b'""', raw)
    brackets = bare.translate(None, _NOT_BRACKET)
    values = bare.count(b",") + len(brackets) // 2 + 1
    if values > max_values:
        return f"holds about {values} JSON values, more than the {max_values} allowed"
    depth = 0
    while brackets:
        inner = _JSON_PAIR.sub(b"", brackets)  # removes exactly one nesting level
        if len(inner) == len(brackets):
            return "has unbalanced brackets (not valid JSON)"
        depth += 1
        if depth > max_depth:
            return f"is nested more than {max_depth} levels deep"
        brackets = inner
    return ""


def load_json(raw: bytes, path: str, what: str, max_depth: int, max_values: int) -> Any:
    """``json.loads`` of checkpoint metadata within bounds; CorruptCheckpointError naming ``what`` otherwise."""
    problem = json_bounds_problem(raw, max_depth, max_values)
    if problem:
        raise CorruptCheckpointError(path, f"{what} {problem}")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptCheckpointError(path, f"{what} is not valid JSON ({exc})") from None


# ----------------------------------------------------------------------------- manifest fields


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> TypeGuard[int | float]:
    return (_is_int(v) or isinstance(v, float)) and not isinstance(v, bool) and math.isfinite(v)


_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")


def _auth_problem(auth: Any) -> str:
    if not (isinstance(auth, dict) and set(auth) == {"alg", "key_id", "mac"}):
        return "auth is not an object of exactly alg, key_id and mac"
    if auth["alg"] != ALG:
        return f"auth alg {str(auth['alg'])[:40]!r} is not {ALG}"
    if not (isinstance(auth["key_id"], str) and _HEX16.match(auth["key_id"])
            and isinstance(auth["mac"], str) and _HEX64.match(auth["mac"])):
        return "auth key_id or mac is not hex of the right length"
    return ""


def manifest_problem(m: dict[str, Any]) -> str:
    """The first field of a parsed manifest whose type or value is wrong (``""`` when all are right).

    Every field any ckptd code reads is checked here, so listing, retention and the commands can use
    them without further checks.
    """
    step = m.get("step")
    if not _is_int(step) or not 0 <= step < 10**20:
        return f"step {step!r} is not a non-negative integer"
    if m.get("kind") not in KINDS:
        return f"kind {m.get('kind')!r} is not one of {', '.join(KINDS)}"
    created = m.get("created")
    if not _is_number(created) or created < 0:
        return f"created {created!r} is not a time in seconds"
    if m.get("hash") != HASH:
        return f"hash {m.get('hash')!r} is not {HASH}"
    files = m.get("files")
    if not isinstance(files, dict):
        return "lacks a valid file list"
    for fname, rec in files.items():
        if not (FILE_RE.match(fname) and fname != MANIFEST and isinstance(rec, dict) and _is_int(rec.get("bytes"))
                and rec["bytes"] >= 0 and isinstance(rec.get(HASH), str) and _HEX32.match(rec[HASH])
                and (MAC_FIELD not in rec or (isinstance(rec[MAC_FIELD], str) and _HEX64.match(rec[MAC_FIELD])))):
            return f"lists a bad file entry {fname!r}"
    if "auth" in m:
        why = _auth_problem(m["auth"])
        if why:
            return why
    metrics = m.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
            v is None or isinstance(v, (str, bool)) or _is_number(v) for v in metrics.values()):
        return "metrics is not an object of numbers, strings, booleans or nulls"
    epoch = m.get("epoch")
    if epoch is not None and not _is_int(epoch):
        return f"epoch {epoch!r} is not an integer"
    versions = m.get("versions", {})
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        return "versions is not an object of strings"
    if not isinstance(m.get("run_id", ""), str):
        return "run_id is not a string"
    if "origin" in m:
        why = origin.problem(m["origin"])
        if why:
            return f"origin {why}"
    if not isinstance(m.get("finished", False), bool):
        return "finished is not true or false"
    why = lineage.stage_problem(m.get("stage"))
    if why:
        return f"stage {why}"
    why = lineage.problem(m.get("lineage"))
    if why:
        return f"lineage {why}"
    return ""


# ----------------------------------------------------------------------------- dcp.json (sharded checkpoints)


def _dims_ok(v: Any, n: int | None = None) -> bool:
    return (isinstance(v, list) and len(v) <= MAX_DIMS and (n is None or len(v) == n)
            and all(_is_int(d) and d >= 0 for d in v))


def _volume(dims: list[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def dcp_problem(doc: Any, files: dict[str, Any]) -> str:
    """Why a sharded checkpoint's ``dcp.json`` does not describe exactly the bytes of its shard files (``""``
    when it does). ``files``: the manifest's file list (name -> {"bytes": N, ...}).

    Every size is checked against bytes that exist before anything is allocated from it (export, restore):
    each tensor's chunks lie inside its shape and add up to all of it; each chunk has exactly one storage entry,
    whose length is the chunk's bytes; and the entries of each shard file tile it, without holes or overlaps.
    So a tensor can never claim more memory than the shard files hold (a 116-byte map claiming 2**40 elements
    with no storage is refused here)."""
    if not (isinstance(doc, dict) and isinstance(doc.get("tensors"), dict) and isinstance(doc.get("storage"), list)):
        return "has no tensors/storage"
    chunks: dict[tuple[str, int], int] = {}  # (fqn, chunk index) -> bytes the chunk needs
    for fqn, m in doc["tensors"].items():
        if not (isinstance(m, dict) and m.get("dtype") in DTYPE_SIZES and _dims_ok(m.get("size"))
                and isinstance(m.get("chunks"), list)):
            return f"tensor {fqn[:80]!r} lacks a valid dtype, size or chunks"
        size, covered = m["size"], 0
        for i, c in enumerate(m["chunks"]):
            if not (isinstance(c, list) and len(c) == 2 and _dims_ok(c[0], len(size)) and _dims_ok(c[1], len(size))
                    and all(o + n <= d for o, n, d in zip(c[0], c[1], size, strict=True))):
                return f"tensor {fqn[:80]!r} has a chunk outside its shape {size}"
            chunks[(fqn, i)] = _volume(c[1]) * DTYPE_SIZES[m["dtype"]]
            covered += _volume(c[1])
        if covered != _volume(size):
            return (f"tensor {fqn[:80]!r} of shape {size} is not covered by its chunks ({covered} of "
                    f"{_volume(size)} elements stored)")
    spans: dict[str, list[tuple[int, int]]] = {}
    for entry in doc["storage"]:
        ok = isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], list) and len(entry[0]) == 3
        parts: Any = entry if ok else (None, None, None, None)
        index, fname, offset, length = parts
        key = (index[0], index[2]) if ok and isinstance(index[0], str) and _is_int(index[2]) else None
        if key is None or key not in chunks or not isinstance(fname, str) or fname not in files \
                or not SHARD_FILE_RE.match(fname) or not _dims_ok([offset, length]) or chunks[key] != length:
            return f"storage entry {str(entry)[:80]} is not one chunk of a listed tensor in a listed shard file"
        del chunks[key]  # each chunk stored once
        spans.setdefault(fname, []).append((offset, length))
    if chunks:
        fqn, i = next(iter(chunks))
        return f"chunk {i} of tensor {fqn[:80]!r} has no storage"
    for fname, rec in files.items():
        if not SHARD_FILE_RE.match(fname):
            continue
        pos = 0
        for offset, length in sorted(spans.get(fname, [])):
            if offset != pos:
                return f"the chunks of {fname} leave holes or overlap (at offset {offset})"
            pos += length
        if pos != rec["bytes"]:
            return f"the chunks of {fname} hold {pos} bytes, the file {rec['bytes']}"
    return ""


# ----------------------------------------------------------------------------- safetensors header


# safetensors dtype name -> element size; the names ckptd writes (state.DTYPES maps torch dtypes to them)
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header, checked: known dtype, shape matching its byte span."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # offsets relative to the data section
    end: int


def read_header_bytes(f: BinaryIO, path: str, file_size: int) -> tuple[bytes, bytes]:
    """The 8-byte length and the JSON header of a safetensors file, bounded; ``f`` must be at offset 0."""
    raw = f.read(8)
    if len(raw) != 8:
        raise CorruptCheckpointError(path, "tensor file shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CorruptCheckpointError(path, f"tensor header length {n} is out of bounds "
                                           f"(file {file_size} bytes, at most {MAX_HEADER_BYTES} allowed)")
    body = f.read(n)
    if len(body) != n:
        raise CorruptCheckpointError(path, "tensor file ends inside its header (truncated)")
    return raw, body


def parse_safetensors_header(body: bytes, path: str, data_len: int) -> tuple[dict[str, Any], list[TensorEntry]]:
    """Check a safetensors JSON header completely; returns (header, entries in file order).

    Every entry needs exactly ``dtype`` (a known name), ``shape`` (a list of at most MAX_DIMS
    non-negative ints) and ``data_offsets`` whose span is exactly the shape's bytes; together the
    spans tile the data section (``data_len`` bytes) without holes or overlaps. So nothing in a
    header that passes can make a reader allocate more than the file holds.
    """
    if body.count(b"{") > MAX_TENSORS + 2:  # every entry is an object: refuse before parsing
        raise CorruptCheckpointError(path, f"tensor header holds more than the {MAX_TENSORS} tensors allowed")
    header = load_json(body, path, "tensor header", 4, MAX_TENSORS * 16)
    if not isinstance(header, dict):
        raise CorruptCheckpointError(path, "tensor header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptCheckpointError(path, "tensor header __metadata__ is not an object of strings")
    entries = []
    for key, rec in header.items():
        if key == "__metadata__":
            continue
        entries.append(_tensor_entry(key, rec, path, data_len))
    entries.sort(key=lambda e: (e.start, e.end))
    pos = 0
    for e in entries:
        if e.start != pos:
            raise CorruptCheckpointError(path, f"tensor data has holes or overlaps (at tensor {e.key!r})")
        pos = e.end
    if pos != data_len:
        raise CorruptCheckpointError(path, f"tensor data does not fill the file ({pos} of {data_len} bytes)")
    return header, entries


def _tensor_entry(key: str, rec: Any, path: str, data_len: int) -> TensorEntry:
    if len(key) > MAX_KEY_CHARS:
        raise CorruptCheckpointError(path, f"tensor name of {len(key)} characters is too long")
    if not isinstance(rec, dict) or set(rec) != {"dtype", "shape", "data_offsets"}:
        raise CorruptCheckpointError(path, f"tensor {key!r} needs exactly dtype, shape and data_offsets")
    dtype, shape, offs = rec["dtype"], rec["shape"], rec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CorruptCheckpointError(path, f"tensor {key!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(d) and d >= 0 for d in shape)):
        raise CorruptCheckpointError(path, f"tensor {key!r} has a bad shape {str(shape)[:80]}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
            and 0 <= offs[0] <= offs[1] <= data_len):
        raise CorruptCheckpointError(path, f"tensor {key!r} has bad data offsets")
    nbytes = DTYPE_SIZES[dtype]
    for d in shape:
        nbytes *= d
    if nbytes != offs[1] - offs[0]:
        raise CorruptCheckpointError(path, f"tensor {key!r}: shape {shape} of {dtype} is {nbytes} bytes, "
                                           f"its data span is {offs[1] - offs[0]}")
    return TensorEntry(key, dtype, tuple(shape), offs[0], offs[1])


def read_safetensors_header(f: BinaryIO, path: str, file_size: int) -> tuple[dict[str, Any], int]:
    """Read and check a safetensors header (see :func:`parse_safetensors_header`); returns (header, data_start)."""
    _, body = read_header_bytes(f, path, file_size)
    header, _ = parse_safetensors_header(body, path, file_size - 8 - len(body))
    return header, 8 + len(body)


def safetensors_header_bytes(entries: list[tuple[str, str, list[int], int]], metadata: dict[str, str] | None = None,
                             align: int = 64) -> bytes:
    """Build the 8-byte length + JSON header for (key, dtype, shape, nbytes) laid out back to back.

    The JSON is padded with spaces (allowed by the format) so the data section starts ``align``-aligned.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for key, dtype, shape, nbytes in entries:
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % align)
    return struct.pack("<Q", len(body)) + body
