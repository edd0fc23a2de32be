"""A spare file descriptor, held so the loop can still do its critical work when the process runs out.

Out of descriptors (EMFILE), the child-exit path could not list ``/proc`` to kill leftovers nor read a
manifest. The supervisor opens ``/dev/null`` once at start and keeps it; :meth:`SpareFd.released`
closes it around work that must not fail for want of a descriptor (the nginx and libev idiom for
``accept``), and takes it back after. Other threads may win the freed slot; everything that work does
must still survive EMFILE, and does (docs/reliability.md, "Threat model").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class SpareFd:
    def __init__(self) -> None:
        self._fd: int | None = None
        self.take()

    def take(self) -> bool:
        """Hold a descriptor again (False: none was free; the next release has nothing to give)."""
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            yield
        finally:
            self.take()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
