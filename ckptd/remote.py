"""The object-store tier: checkpoints copied to S3 (and S3-compatible servers, GCS, Azure Blob) and back.

Layout under ``s3://BUCKET/PREFIX/``: one key prefix per uploaded checkpoint, unique to that upload and never
written twice::

    step-000000000300.UPLOAD/tensors.safetensors     the checkpoint's files, byte for byte
    step-000000000300.UPLOAD/state.json
    step-000000000300.UPLOAD/manifest.json           written last, with a conditional put (If-None-Match: *)

A remote checkpoint exists only once its manifest is there: an upload cut short (the process or the server
killed, a network partition) leaves objects no reader looks at. The manifest is the local one, byte for byte
(same digest), so both tiers name the same checkpoint the same way. An upload hashes the bytes it sends and
writes no manifest unless they match the manifest's xxh3-128 (the request signature carries each request's
SHA-256, which the server checks: the transport's own integrity check). A download writes into a temporary
directory, checks every byte against the manifest, and renames it into place (temp, fsync, rename, fsync).
Deleting removes the manifest first. Nothing here imports torch.

The client is obstore (Rust's object_store): the fastest of the clients measured against a real S3 server
(benchmarks/bench_s3_clients.py, docs/remote.md), one interface for S3, GCS and Azure, conditional puts, and
transfers that run outside the GIL. Credentials come from the client's standard sources (``AWS_*`` environment
variables, instance roles) and are never logged.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast, overload
from urllib.parse import urlparse

import xxhash

from . import store
from .errors import CkptdError, CorruptCheckpointError, StorageError
from .progress import Progress

SCHEMES = ("s3", "gs", "az")
PART = 8 << 20  # bytes per multipart part and per ranged read
CONCURRENCY = 8  # parts in flight
WINDOW = CONCURRENCY * 4  # ranged reads requested at once by a download (bounded memory: 256 MiB)
KEY_RE = re.compile(r"^(step-[0-9]{12,20})\.([0-9a-f]{8,40})$")


class RemoteError(StorageError):
    """The object store refused or failed an operation (exit 5); the message names the URL and the cause."""

    def __init__(self, message: str) -> None:
        CkptdError.__init__(self, message)


@dataclass(frozen=True)
class RemoteSpec:
    """Where the remote tier is: ``s3://bucket/prefix`` (``gs://``, ``az://``) and how to reach it."""

    url: str
    endpoint: str | None = None  # S3-compatible servers: http(s)://host:port
    region: str | None = None
    path_style: bool = False  # S3 path-style addressing (most self-hosted servers)

    @classmethod
    def parse(cls, url: str, endpoint: str | None = None, region: str | None = None,
              path_style: bool | None = None) -> RemoteSpec:
        check_url(url)
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
        if endpoint is not None:
            check_endpoint(endpoint)
        if path_style is None:
            path_style = endpoint is not None  # a self-hosted server rarely has per-bucket DNS names
        return cls(url.rstrip("/"), endpoint, region or os.environ.get("AWS_REGION") or None, path_style)


def spec_from_env(environ: Any = None) -> RemoteSpec | None:
    """The remote tier ``ckptd run --remote`` hands its child (``CKPTD_REMOTE`` and the ``CKPTD_REMOTE_*`` settings,
    ckptd/env.py); None when ``CKPTD_REMOTE`` is unset or empty."""
    from . import env

    e = os.environ if environ is None else environ
    url = e.get(env.REMOTE) or ""
    if not url:
        return None
    return RemoteSpec.parse(url, e.get(env.REMOTE_ENDPOINT) or None, e.get(env.REMOTE_REGION) or None,
                            path_style=False if e.get(env.REMOTE_VIRTUAL_HOSTED) == "1" else None)


def check_url(url: str) -> None:
    """Raise CkptdError when ``url`` does not name a remote tier (a URL holding credentials is never echoed)."""
    u = urlparse(url)
    if "@" in u.netloc:
        raise CkptdError("the remote URL holds credentials (USER@ or USER:SECRET@); write s3://BUCKET/PREFIX and give "
                         "credentials the standard way (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, the "
                         "instance role)")
    if u.scheme not in SCHEMES or not u.netloc or u.query or u.fragment or "\\" in url:
        raise CkptdError(f"bad remote {url!r}: write s3://BUCKET/PREFIX (or gs://, az://), e.g. "
                         "s3://my-bucket/runs/llm-7b")


def check_endpoint(endpoint: str) -> None:
    u = urlparse(endpoint)
    if "@" in u.netloc:
        raise CkptdError("the endpoint URL holds credentials (USER@ or USER:SECRET@); write http(s)://HOST[:PORT] and "
                         "give credentials in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if u.scheme not in ("http", "https") or not u.netloc:
        raise CkptdError(f"bad endpoint {endpoint!r}: write http(s)://HOST[:PORT], e.g. http://127.0.0.1:9000")


@dataclass
class RemoteCheckpoint:
    """One checkpoint on the remote tier (``valid``: its manifest parses, verifies its digest and lists files
    that are all there at their sizes; no data read)."""

    name: str
    key: str  # the upload's key prefix, e.g. step-000000000300.1a2b3c4d
    step: int
    valid: bool = True
    reason: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)
    raw_manifest: bytes = b""
    sizes: dict[str, int] = field(default_factory=dict)  # object name -> size, as listed

    @property
    def created(self) -> float:
        return float(self.manifest.get("created", 0.0))

    @property
    def bytes(self) -> int:
        return sum(r["bytes"] for r in self.manifest.get("files", {}).values()) if self.valid else 0

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", "?"))

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.manifest.get("metrics") or {})

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "step": self.step, "kind": self.kind, "created": self.created,
                "bytes": self.bytes, "valid": self.valid, "reason": self.reason, "metrics": self.metrics,
                "finished": self.manifest.get("finished") is True}


class RemoteTier:
    """The object store at ``spec``: list, upload, download and delete checkpoints (see the module docstring)."""

    def __init__(self, spec: RemoteSpec, *, part: int = PART, concurrency: int = CONCURRENCY,
                 timeout_s: float = 60.0, max_retries: int = 4) -> None:
        try:
            import obstore
            from obstore.store import from_url
        except ImportError:
            raise CkptdError("the remote tier needs the obstore package: pip install 'ckptd[remote]'") from None
        self.spec, self.part, self.concurrency = spec, part, concurrency
        self._obs = obstore
        config: dict[str, Any] = {}
        if spec.url.startswith("s3://"):
            if spec.endpoint:
                config["endpoint"] = spec.endpoint
            if spec.region:
                config["region"] = spec.region
            config["virtual_hosted_style_request"] = not spec.path_style
        client: Any = {"timeout": f"{int(timeout_s)}s", "connect_timeout": "10s",
                       "allow_http": bool(spec.endpoint and spec.endpoint.startswith("http://"))}
        retry: Any = {"max_retries": max_retries, "retry_timeout": _td(timeout_s * 2),
                      "backoff": {"init_backoff": _td(0.1), "max_backoff": _td(5.0), "base": 2.0}}
        try:  # the config's keys depend on the scheme: typed per store, given here as one dict
            self.store = from_url(spec.url, config=cast(Any, config), client_options=client, retry_config=retry)
        except Exception as exc:  # noqa: BLE001  (obstore raises its own types for a bad URL or configuration)
            raise CkptdError(f"cannot use the remote {spec.url}: {_cause(exc)}") from None

    # ------------------------------------------------------------------ reading

    def checkpoints(self) -> list[RemoteCheckpoint]:
        """Every checkpoint on the remote tier that has a manifest, oldest first (by step, then time)."""
        return self._scan(float("inf"), time.time())[0]

    def _inspect(self, key: str, sizes: dict[str, int]) -> RemoteCheckpoint | None:
        """``key``'s checkpoint as its manifest describes it; None when the manifest is gone since the listing
        (retention deleted it meanwhile: from then on the checkpoint does not exist for any reader)."""
        name = KEY_RE.match(key).group(1)  # type: ignore[union-attr]
        rc = RemoteCheckpoint(name=name, key=key, step=int(name[5:]), sizes=sizes)
        where = f"{self.spec.url}/{key}"
        try:
            if sizes[store.MANIFEST] > store.MAX_MANIFEST_BYTES:
                raise CorruptCheckpointError(where, f"{store.MANIFEST} is {sizes[store.MANIFEST]} bytes")
            raw = self._get_small(f"{key}/{store.MANIFEST}", missing_ok=True)
            if raw is None:
                return None
            m = store.parse_manifest(raw, where)
            if m["step"] != rc.step:
                raise CorruptCheckpointError(where, f"the key says step {rc.step}, the manifest says {m['step']}")
            for fname, rec in m["files"].items():
                if fname not in sizes:
                    raise CorruptCheckpointError(where, f"{fname} is missing")
                if sizes[fname] != rec["bytes"]:
                    raise CorruptCheckpointError(where, f"{fname} is {sizes[fname]} bytes, manifest says "
                                                 f"{rec['bytes']}")
        except CorruptCheckpointError as exc:
            rc.valid, rc.reason = False, exc.reason
            return rc
        rc.manifest, rc.raw_manifest = m, raw
        return rc

    def latest_valid(self) -> RemoteCheckpoint | None:
        valid = [c for c in self.checkpoints() if c.valid]
        return valid[-1] if valid else None

    def fetch_newer(self, root: str, warn: Callable[[str], None]) -> tuple[store.CheckpointInfo, RemoteCheckpoint,
                                                                            float] | None:
        """Restore on a fresh machine: download into ``root`` the newest remote checkpoint that verifies when it is
        newer (step, then commit time) than the newest valid local one; returns (the local copy, the remote one,
        seconds), or None when the local tier is as new (a newer valid local checkpoint wins). A remote candidate
        that fails the download's checks is skipped (``warn``) for the next older one. On a terminal (stderr) the
        download draws a progress line; piped, it is quiet. Raises RemoteError when the remote tier fails,
        StorageError when the local disk does."""
        local = [i for i in store.list_checkpoints(root) if i.valid] if os.path.isdir(root) else []
        newest_local = (local[-1].step, local[-1].created) if local else None
        for rc in reversed([c for c in self.checkpoints() if c.valid]):
            if newest_local is not None and (rc.step, rc.created) <= newest_local:
                return None
            t0 = time.monotonic()
            try:
                with Progress(f"download {rc.key}", rc.bytes) as prog:
                    info = self.download(rc, root, progress=prog)
            except CkptdError as exc:
                if isinstance(exc, StorageError):  # the server or the local disk failed: not this candidate's fault
                    raise
                warn(f"{self.spec.url}/{rc.key}: {getattr(exc, 'reason', exc)}; taking the next older one")
                continue
            return info, rc, time.monotonic() - t0
        return None

    @overload
    def _get_small(self, path: str) -> bytes: ...
    @overload
    def _get_small(self, path: str, missing_ok: bool) -> bytes | None: ...

    def _get_small(self, path: str, missing_ok: bool = False) -> bytes | None:
        try:
            return bytes(self._obs.get(self.store, path).bytes())
        except Exception as exc:  # noqa: BLE001  (obstore's error types and transport errors: each becomes one RemoteError)
            if missing_ok and isinstance(exc, FileNotFoundError):  # obstore's "no such object"
                return None
            raise self._error("read", f"{self.spec.url}/{path}", exc) from None

    # ------------------------------------------------------------------ upload

    def upload(self, local: str, progress: Callable[[int], None] | None = None,
               pause: Callable[[float], None] | None = None) -> RemoteCheckpoint:
        """Copy the committed checkpoint at ``local`` to the remote tier; returns it as listed there.

        ``pause(seconds)``, when given, is called after each part is read with the time the part took since
        the one before (a background uploader paces itself with it). Raises CorruptCheckpointError (nothing
        committed remotely) when the bytes read differ from the manifest's checksums, RemoteError when the
        store fails."""
        info = store.inspect_checkpoint(local)
        if not info.valid:
            raise CorruptCheckpointError(local, info.reason)
        raw = store.read_small(os.path.join(local, store.MANIFEST), store.MAX_MANIFEST_BYTES)
        m = store.parse_manifest(raw, local)
        key = f"{info.name}.{uuid.uuid4().hex}"
        written: list[str] = []
        try:
            for fname, rec in sorted(m["files"].items()):
                path = f"{key}/{fname}"
                written.append(path)
                digest = self._put_file(os.path.join(local, fname), path, rec["bytes"], progress, pause)
                if digest != rec[store.HASH]:
                    raise CorruptCheckpointError(local, f"{fname} does not match its checksum (xxh3-128 {digest}, "
                                                 f"manifest {rec[store.HASH]}); nothing was committed remotely")
            try:  # last, and only if absent: the remote commit
                self._obs.put(self.store, f"{key}/{store.MANIFEST}", raw, mode="create")
            except Exception as exc:  # noqa: BLE001  (obstore's error types and transport errors: each becomes one RemoteError)
                raise self._error("commit", f"{self.spec.url}/{key}/{store.MANIFEST}", exc) from None
        except BaseException:
            self._delete_quietly(written)
            raise
        sizes = {**{f: r["bytes"] for f, r in m["files"].items()}, store.MANIFEST: len(raw)}
        return RemoteCheckpoint(name=info.name, key=key, step=m["step"], manifest=m, raw_manifest=raw, sizes=sizes)

    def _put_file(self, local: str, path: str, size: int, progress: Callable[[int], None] | None,
                  pause: Callable[[float], None] | None = None) -> str:
        fd = os.open(local, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        h = xxhash.xxh3_128()
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CorruptCheckpointError(local, "is not a regular file")
            store.advise_sequential(fd)

            def chunks() -> Iterator[bytes]:
                left = size
                last = time.monotonic()
                while left:
                    if pause is not None:
                        now = time.monotonic()
                        pause(now - last)
                        last = time.monotonic()
                    chunk = os.read(fd, min(self.part, left))
                    if not chunk:
                        raise CorruptCheckpointError(local, f"ends {left} bytes early (changed during the upload)")
                    h.update(chunk)
                    left -= len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                    yield chunk

            try:
                if size <= self.part:
                    self._obs.put(self.store, path, b"".join(chunks()) if size else b"", use_multipart=False)
                else:
                    self._obs.put(self.store, path, chunks(), chunk_size=self.part, max_concurrency=self.concurrency)
            except CorruptCheckpointError:
                raise
            except Exception as exc:  # noqa: BLE001  (obstore's error types and transport errors: each becomes one RemoteError)
                inner = exc.__cause__ or exc.__context__
                if isinstance(inner, CorruptCheckpointError):
                    raise inner from None
                raise self._error("upload", f"{self.spec.url}/{path}", exc) from None
            if os.read(fd, 1):
                raise CorruptCheckpointError(local, "is longer than its manifest says (changed during the upload)")
        finally:
            os.close(fd)
        return h.hexdigest()

    # ------------------------------------------------------------------ download

    def download(self, rc: RemoteCheckpoint, root: str,
                 progress: Callable[[int], None] | None = None) -> store.CheckpointInfo:
        """Copy ``rc`` into the local directory ``root`` (created if needed) and return it as a local checkpoint.
        A valid local checkpoint of that step is kept as it is. Every byte is checked against the manifest
        before the checkpoint becomes visible; on any failure nothing is left behind."""
        if not rc.valid:
            raise CorruptCheckpointError(f"{self.spec.url}/{rc.key}", rc.reason)
        os.makedirs(root, store.DIR_MODE, exist_ok=True)
        final = os.path.join(root, rc.name)
        if os.path.lexists(final):
            info = store.inspect_checkpoint(final)
            if info.valid:
                return info
            raise CkptdError(f"{final} exists and is invalid ({info.reason}); move it aside (restore() quarantines "
                             "it) before downloading that step again")
        tmp = os.path.join(root, store.temp_name(rc.name))
        try:
            os.mkdir(tmp, store.DIR_MODE)
        except OSError as exc:
            raise StorageError(tmp, "mkdir", exc) from None
        try:
            dfd = store.open_dir(tmp)
            try:
                for fname, rec in sorted(rc.manifest["files"].items()):
                    digest = self._get_file(rc, fname, rec["bytes"], dfd, progress)
                    if digest != rec[store.HASH]:
                        raise CorruptCheckpointError(f"{self.spec.url}/{rc.key}", f"{fname} does not match its "
                                                     "checksum (changed or damaged on the remote tier)")
                fd = self._create_at(dfd, store.MANIFEST)
                try:
                    store.write_fully(fd, rc.raw_manifest)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.fsync(dfd)
            finally:
                os.close(dfd)
            os.rename(tmp, final)
            store.fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return store.inspect_checkpoint(final)

    def _get_file(self, rc: RemoteCheckpoint, fname: str, size: int, dfd: int,
                  progress: Callable[[int], None] | None) -> str:
        h = xxhash.xxh3_128()
        fd = self._create_at(dfd, fname)
        try:
            for view in self._ranges(rc, fname, size, "download"):
                h.update(view)
                store.write_fully(fd, view)  # ranges arrive in order: the file grows sequentially
                if progress is not None:
                    progress(len(view))
            os.fsync(fd)
        finally:
            os.close(fd)
        return h.hexdigest()

    def _ranges(self, rc: RemoteCheckpoint, fname: str, end: int, op: str, first: int = 0) -> Iterator[memoryview]:
        """Bytes ``first`` to ``end`` of ``fname`` of ``rc`` in order, in parts, at most WINDOW of them at once."""
        path = f"{rc.key}/{fname}"
        starts = list(range(first, end, self.part))
        for i in range(0, len(starts), WINDOW):
            batch = starts[i:i + WINDOW]
            ends = [min(s + self.part, end) for s in batch]
            try:
                bufs = self._obs.get_ranges(self.store, path, starts=batch, ends=ends)
            except Exception as exc:  # noqa: BLE001  (obstore's error types and transport errors: each becomes one RemoteError)
                raise self._error(op, f"{self.spec.url}/{path}", exc) from None
            for s, e, buf in zip(batch, ends, bufs, strict=True):
                view = memoryview(buf)
                if len(view) != e - s:
                    raise CorruptCheckpointError(f"{self.spec.url}/{rc.key}", f"{fname} is shorter than listed")
                yield view

    def read(self, rc: RemoteCheckpoint, fname: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` of one of ``rc``'s files (a file the manifest lists, a range within its listed
        size: what an outsider's listing claims never sizes an allocation beyond that)."""
        size = rc.sizes.get(fname)
        if not rc.valid or fname not in rc.manifest.get("files", {}) or size is None or not 0 <= start <= end <= size:
            raise CorruptCheckpointError(f"{self.spec.url}/{rc.key}", f"{fname}: bytes {start}..{end} are not "
                                         f"within the file (listed {size} bytes)")
        if start == end:
            return b""
        return b"".join(bytes(v) for v in self._ranges(rc, fname, end, "read", first=start))

    def verify(self, rc: RemoteCheckpoint, progress: Callable[[int], None] | None = None) -> str:
        """Read every byte of ``rc`` from the remote tier (nothing is written locally) and check it against the
        manifest's checksums; returns why it is invalid, or "" when it verifies. Raises RemoteError when the store
        fails (that says nothing about the checkpoint)."""
        if not rc.valid:
            return rc.reason
        for fname, rec in sorted(rc.manifest["files"].items()):
            h = xxhash.xxh3_128()
            try:
                for view in self._ranges(rc, fname, rec["bytes"], "verify"):
                    h.update(view)
                    if progress is not None:
                        progress(len(view))
            except CorruptCheckpointError as exc:
                return exc.reason
            if h.hexdigest() != rec[store.HASH]:
                return f"{fname} does not match its checksum (changed or damaged on the remote tier)"
        return ""

    @staticmethod
    def _create_at(dfd: int, name: str) -> int:
        """A new file ``name`` in the download's temporary directory (never through a link)."""
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, store.FILE_MODE,
                       dir_fd=dfd)

    # ------------------------------------------------------------------ retention

    def prune(self, policy: Any, *, dry_run: bool = False, stale_after: float = 24 * 3600.0,
              now: float | None = None) -> tuple[dict[str, list[str]], list[RemoteCheckpoint], list[str]]:
        """Apply a retention policy (``retention.Policy``) to the remote tier, as ``ckptd prune`` does locally
        (the newest valid checkpoint always stays; invalid ones are never deleted), and remove what uploads
        that never committed left behind (key prefixes without a manifest whose newest object is older than
        ``stale_after`` seconds: an upload in flight is never cut). Returns (kept key: reasons, deleted,
        removed stale prefixes)."""
        from . import retention

        listed, stale = self._scan(stale_after, time.time() if now is None else now)
        by_key = {c.key: c for c in listed}
        views = [store.CheckpointInfo(name=c.key, path=f"{self.spec.url}/{c.key}", step=c.step, kind=c.kind,
                                      created=c.created, bytes=c.bytes, metrics=c.metrics, valid=c.valid,
                                      reason=c.reason, manifest=c.manifest) for c in listed]
        keep, doomed = retention.plan(views, policy)
        deleted = [by_key[i.name] for i in doomed]
        if not dry_run:
            for rc in deleted:
                self.delete(rc)
            for key, names in stale.items():
                self._delete_quietly([f"{key}/{n}" for n in names])
        return keep, deleted, sorted(stale)

    def _scan(self, stale_after: float, now: float) -> tuple[list[RemoteCheckpoint], dict[str, list[str]]]:
        objects: dict[str, dict[str, int]] = {}
        newest: dict[str, float] = {}
        try:
            for batch in self._obs.list(self.store, chunk_size=1000):
                for meta in batch:
                    head, _, leaf = meta["path"].partition("/")
                    if KEY_RE.match(head) and leaf and "/" not in leaf:
                        objects.setdefault(head, {})[leaf] = int(meta["size"])
                        t = meta.get("last_modified")
                        newest[head] = max(newest.get(head, 0.0), t.timestamp() if t is not None else now)
        except Exception as exc:  # noqa: BLE001  (obstore's error types and transport errors: each becomes one RemoteError)
            raise self._error("list", self.spec.url, exc) from None
        inspected = (self._inspect(k, v) for k, v in objects.items() if store.MANIFEST in v)
        listed = sorted((c for c in inspected if c is not None), key=lambda c: (c.step, c.created, c.key))
        stale = {k: sorted(v) for k, v in objects.items()
                 if store.MANIFEST not in v and now - newest.get(k, now) > stale_after}
        return listed, stale

    # ------------------------------------------------------------------ delete

    def delete(self, rc: RemoteCheckpoint) -> None:
        """Remove ``rc``: its manifest first (from then on it does not exist for any reader), then its files."""
        try:
            self._obs.delete(self.store, f"{rc.key}/{store.MANIFEST}")
        except Exception as exc:  # noqa: BLE001  (obstore's error types and transport errors: each becomes one RemoteError)
            raise self._error("delete", f"{self.spec.url}/{rc.key}/{store.MANIFEST}", exc) from None
        self._delete_quietly([f"{rc.key}/{n}" for n in rc.sizes if n != store.MANIFEST])

    def _delete_quietly(self, paths: list[str]) -> None:
        """Best effort: what is left is invisible (no manifest) and removed by ``ckptd prune --remote`` later."""
        for p in paths:
            try:
                self._obs.delete(self.store, p)
            except Exception:  # noqa: BLE001  (best effort: what is left has no manifest)
                pass

    def _error(self, op: str, where: str, exc: BaseException) -> RemoteError:
        cause = _cause(exc)
        if "169.254.169.254" in cause and not os.environ.get("AWS_ACCESS_KEY_ID"):
            return RemoteError(f"remote {op} failed for {where}: no credentials (none in the environment, and no "
                               "instance role answered); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run "
                               "where an instance role grants access")
        return RemoteError(f"remote {op} failed for {where}: {cause}; check the endpoint, the credentials and that the "
                           "bucket exists")


def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _td(seconds: float) -> Any:
    import datetime

    return datetime.timedelta(seconds=seconds)
