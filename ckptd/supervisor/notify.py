"""sd_notify, hand-written: READY=1, STATUS=..., STOPPING=1, WATCHDOG=1 to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self._address = address
        # Ping at half the interval systemd expects, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        usec = env.get("WATCHDOG_USEC", "")
        owner = env.get("WATCHDOG_PID", "")
        watchdog = int(usec) if usec.isdigit() and (not owner or owner == str(os.getpid())) else None
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> None:
        if self._address is None:
            return
        address = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), address)
        except OSError:
            pass  # the service manager went away; nothing to tell

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# The child must not talk to the service manager as if it were the service.
CHILD_UNSET = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
