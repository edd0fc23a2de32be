"""The supervisor side of ckptd (`ckptd run`): never imports torch.

Modules, one idea each: ``config`` (schema, YAML, CLI merge), ``states`` (the child's state machine),
``policy`` (exit classification, backoff, restart budget), ``process`` (the only module that spawns,
signals and reaps), ``control`` (socket server), ``client`` (socket client), ``journal`` (events and
state file), ``rundir`` (lock, socket path), ``schedule`` (APScheduler), ``watch`` (watchdog),
``notify`` (sd_notify), ``service`` (what systemd hears, when), ``log`` (stderr lines), ``clock``, and
``loop`` (the Supervisor).
"""

from __future__ import annotations

__all__: list[str] = []
