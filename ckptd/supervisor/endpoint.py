"""The run's metrics port: /metrics and /healthz (metrics.MetricsServer), its Prometheus file_sd entry, and
how long the final state is served after the run (``metrics.linger``). docs/metrics.md.

A busy or bad address never stops training: one warning, and the run goes on without the port.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from . import metrics as metricsmod
from .config import MetricsConfig


def new_registry() -> Any:
    """A registry of this run's own (never prometheus-client's global one)."""
    from prometheus_client import CollectorRegistry

    return CollectorRegistry(auto_describe=True)


class MetricsPort:
    def __init__(self, metrics: metricsmod.RunMetrics, log: Callable[..., None]) -> None:
        self._metrics = metrics
        self._log = log
        self.server: metricsmod.MetricsServer | None = None
        self._sd_file: str | None = None

    def start(self, mc: MetricsConfig, run_id: str) -> None:
        """Serve /metrics and /healthz on ``mc.addr``; write the file_sd entry when ``mc.sd_file`` names one."""
        if not mc.addr:
            return
        self.server = metricsmod.MetricsServer(self._metrics.registry, lambda: self._metrics.healthy)
        endpoint = self.server.start(mc.addr)
        if endpoint.state != "serving":
            self._log("warning", "metrics", f"metrics unavailable: {endpoint.error}; training goes on without "
                      "them (choose another --metrics-addr, port 0 for any free port, or 'off')")
            return
        self._log("info", "metrics", f"serving metrics on http://{endpoint.addr}/metrics (also /healthz)")
        if mc.sd_file:
            path = metricsmod.sd_path(mc.sd_file, run_id)
            try:
                metricsmod.write_sd_file(path, endpoint.addr or "", {})
            except OSError as exc:
                self._log("warning", "metrics", f"cannot write the Prometheus file_sd entry {path} "
                          f"({exc.strerror or exc}); Prometheus will not discover this run through it")
                return
            self._sd_file = endpoint.sd_file = path

    def describe(self) -> dict[str, Any]:
        """What `ckptd status` and the journal's `start` event show about the port."""
        server = self.server
        return server.endpoint.as_dict() if server is not None else metricsmod.Endpoint("off").as_dict()

    def linger_seconds(self, mc: MetricsConfig) -> float:
        """How long the final state will still be served after the run ended (0: not at all)."""
        server = self.server
        return mc.linger if server is not None and server.endpoint.state == "serving" else 0.0

    def close(self) -> None:
        """Remove the file_sd entry, then stop serving."""
        if self._sd_file is not None:
            with contextlib.suppress(OSError):
                metricsmod.remove_sd_file(self._sd_file)
        if self.server is not None:
            self.server.close()
