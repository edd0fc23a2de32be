"""Client side of the control socket for `ckptd save|stop|status`: connect, ask, read replies."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from .. import protocol
from ..errors import NotRunningError
from .rundir import find_socket_path


class ControlClient:
    def __init__(self, root: str, timeout: float = 10.0, node_rank: int | None = None) -> None:
        self.root = root
        path = find_socket_path(root, node_rank)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            raise NotRunningError(f"the supervisor of {os.path.abspath(root)} does not answer on {path} "
                                  f"({exc.strerror or exc}); is `ckptd run` still running?") from None
        self._decoder = protocol.LineDecoder()
        self.send(protocol.HELLO, role="client", pid=os.getpid())

    def send(self, type_: str, **fields: Any) -> None:
        self._sock.sendall(protocol.encode({"type": type_, **fields}))

    def replies(self, deadline: float | None) -> Iterator[dict[str, Any]]:
        """Yield replies until the supervisor closes the connection or ``deadline`` (monotonic) passes."""
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self._sock.settimeout(left)
            else:
                self._sock.settimeout(None)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise TimeoutError from None
            if not data:
                return
            yield from self._decoder.feed(data)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_dir() -> str:
    return os.environ.get("CKPTD_DIR") or "checkpoints"
