"""The key of authenticated checkpoints: loading it from a file, and the keyed BLAKE3 made with it.

Optional (off by default; docs/reliability.md, "Authenticated checkpoints"). With a key, every file of a
checkpoint gets a keyed BLAKE3 (its MAC) computed from the same bytes as its xxh3 checksum, and the manifest
gets a MAC over its canonical encoding (format.manifest_mac), so whoever can rewrite a checkpoint but has no
key cannot make it authenticate. Two subkeys are derived from the key file's bytes with BLAKE3's key
derivation, one for files and one for the manifest (domain separation: a file's bytes never pass for a
manifest), and a key id (a MAC of a constant) tells which key a checkpoint was written with without
revealing it.

The key file is read once, never through a link, and must be a regular file that only its owner (this uid
or root) can read or write; its bytes are never logged, never in an error message, never in a manifest.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from ..env import ALLOW_UNKEYED as ALLOW_UNKEYED_ENV  # "1": with a key, unkeyed checkpoints are still accepted
from ..env import KEY_FILE as KEY_ENV  # a key file's path (ckptd run sets it from key_file:; the commands read it)
from ..errors import ConfigError

MAC_FIELD = "blake3_keyed"  # a file record's MAC, 64 hex digits
ALG = "blake3-keyed/1"  # the manifest's "auth" alg: subkeys derived as below, MACs over the canonical bytes
MIN_KEY_BYTES = 32
MAX_KEY_BYTES = 4096
_FILE_CONTEXT = "ckptd 2026-12 checkpoint file MAC"
_MANIFEST_CONTEXT = "ckptd 2026-12 checkpoint manifest MAC"
_ID_CONTEXT = "ckptd 2026-12 key id"
KEY_FIX = ("create one with `umask 077; openssl rand -hex 32 > ckptd.key` (at least 32 bytes; only its owner may "
           "read it)")


def _blake3() -> Any:
    try:
        import blake3
    except ImportError:
        raise ConfigError("authenticated checkpoints (a key file) need the blake3 package: "
                          "pip install 'ckptd[keyed]' (or pip install blake3)") from None
    return blake3.blake3


class Key:
    """A loaded key: makes the keyed BLAKE3 hashers of files and the manifest's MAC.

    ``allow_unkeyed``: a checkpoint written without a key is accepted (its checksums verified, its authenticity
    not); by default a reader holding a key refuses one. ``path`` names the file in messages (never the bytes).
    """

    def __init__(self, material: bytes, path: str = "", allow_unkeyed: bool = False) -> None:
        if not MIN_KEY_BYTES <= len(material) <= MAX_KEY_BYTES:
            raise ConfigError(f"key file {path or '(given)'} holds {len(material)} bytes; a key is "
                              f"{MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes: {KEY_FIX}")
        b3 = _blake3()
        self._b3 = b3
        self._file_key = b3(material, derive_key_context=_FILE_CONTEXT).digest()
        self._manifest_key = b3(material, derive_key_context=_MANIFEST_CONTEXT).digest()
        self.id = b3(material, derive_key_context=_ID_CONTEXT).hexdigest()[:16]
        self.path = path
        self.allow_unkeyed = allow_unkeyed

    def __repr__(self) -> str:  # never the key's bytes
        return f"Key(id={self.id}, path={self.path!r}, allow_unkeyed={self.allow_unkeyed})"

    def file_hasher(self) -> Any:
        """A keyed BLAKE3 for one file's bytes (multi-threaded over large updates)."""
        return self._b3(key=self._file_key, max_threads=self._b3.AUTO)

    def manifest_mac(self, canonical: bytes) -> str:
        return self._b3(canonical, key=self._manifest_key).hexdigest()

    @classmethod
    def load(cls, path: str, allow_unkeyed: bool = False) -> Key:
        """The key in the file ``path``: its bytes less trailing whitespace (a newline an editor adds).

        Refused (ConfigError naming the fix): a link, anything but a regular file, a file another account owns,
        a file its group or others may read or write, a size outside 32-4096 bytes."""
        path = os.path.abspath(os.fspath(path))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigError(f"key file {path} is a symlink; name the key file itself (ckptd never reads a key "
                                  "through a link)") from None
            raise ConfigError(f"key file {path} cannot be opened: {exc.strerror}; {KEY_FIX}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"key file {path} is not a regular file; name a file holding the key: {KEY_FIX}")
            if st.st_uid not in (os.geteuid(), 0):
                raise ConfigError(f"key file {path} belongs to uid {st.st_uid}, not to uid {os.geteuid()} or root; "
                                  f"another account could change it: chown {os.geteuid()} {path}")
            if st.st_mode & 0o077:
                raise ConfigError(f"key file {path} has mode {stat.S_IMODE(st.st_mode):o}: its group or others may "
                                  f"read or write it; make it private: chmod 600 {path}")
            if st.st_size > MAX_KEY_BYTES + 64:
                raise ConfigError(f"key file {path} is {st.st_size} bytes; a key is {MIN_KEY_BYTES} to "
                                  f"{MAX_KEY_BYTES} bytes: {KEY_FIX}")
            raw = os.read(fd, MAX_KEY_BYTES + 65)
        finally:
            os.close(fd)
        return cls(raw.rstrip(b" \t\r\n"), path, allow_unkeyed)


def from_env(environ: Any = None) -> Key | None:
    """The key ``$CKPTD_KEY_FILE`` names (``$CKPTD_ALLOW_UNKEYED=1``: unkeyed checkpoints accepted); None
    when it is unset or empty."""
    environ = os.environ if environ is None else environ
    path = environ.get(KEY_ENV) or ""
    if not path:
        return None
    return Key.load(path, allow_unkeyed=environ.get(ALLOW_UNKEYED_ENV) == "1")
