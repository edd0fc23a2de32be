"""The environment contract between `ckptd run` and the trainer it starts.

`ckptd run` sets these in the child's environment; the trainer library reads
them. Every name is documented in the README ("Environment").
"""

from __future__ import annotations

import os

DIR = "CKPTD_DIR"  # checkpoint root
EVERY_STEPS = "CKPTD_EVERY_STEPS"  # save every N steps (overrides Checkpointer(every_steps=))
EVERY_SECONDS = "CKPTD_EVERY_SECONDS"  # save every T seconds (overrides Checkpointer(every_seconds=))
KEEP_LAST = "CKPTD_KEEP_LAST"  # retention: keep the newest N (library applies it after each commit)
RUN_ID = "CKPTD_RUN_ID"  # identifier of the supervised run (stable across restarts)
RESTART_COUNT = "CKPTD_RESTART_COUNT"  # 0 on the first start, then 1, 2, ...
CONTROL = "CKPTD_CONTROL"  # path of the supervisor's unix control socket
STOP_DEADLINE = "CKPTD_STOP_DEADLINE"  # unix time by which a pending stop must be done ("" if none)
EXIT_ON_STOP = "CKPTD_EXIT_CODE_PREEMPTED"  # exit code the trainer uses after an emergency save
METRICS = "CKPTD_METRICS"  # "0": the supervisor serves no metrics, the trainer sends no metric figures
ORIGIN = "CKPTD_ORIGIN"  # JSON: the command, config and branch point of the run (origin.py), kept in manifests
RESUME_FROM = "CKPTD_RESUME_FROM"  # `ckptd run --resume-from`: restore() loads it when DIR holds no checkpoint
RESUME_PARTS = "CKPTD_RESUME_PARTS"  # `ckptd run --resume-parts model,optimizer`: what the branch restores
STAGE = "CKPTD_STAGE"  # `ckptd run --stage NAME`: the run's stage when the Checkpointer names none
RETENTION = "CKPTD_RETENTION"  # "1": the supervisor applies a retention rule (no warning about a growing DIR)
REMOTE = "CKPTD_REMOTE"  # the object-store tier, s3://BUCKET/PREFIX: restore() takes a newer checkpoint from there
REMOTE_ENDPOINT = "CKPTD_REMOTE_ENDPOINT"  # its S3-compatible server ("": $AWS_ENDPOINT_URL or the cloud's own)
REMOTE_REGION = "CKPTD_REMOTE_REGION"  # its region ("": $AWS_REGION)
REMOTE_VIRTUAL_HOSTED = "CKPTD_REMOTE_VIRTUAL_HOSTED"  # "1": bucket.host addressing with an endpoint
UPLOAD_HOLD = "CKPTD_UPLOAD_HOLD"  # "1": retention keeps local checkpoints the remote tier does not cover yet

MEMORY_FD = "CKPTD_MEMORY_FD"  # `ckptd run --memory`: the descriptor of the memory region snapshots go into
SNAPSHOT_EVERY_STEPS = "CKPTD_SNAPSHOT_EVERY_STEPS"  # with MEMORY_FD: a memory-only snapshot every N steps
KEY_FILE = "CKPTD_KEY_FILE"  # authenticated checkpoints: the key file (store.auth; also read by the commands)
ALLOW_UNKEYED = "CKPTD_ALLOW_UNKEYED"  # "1": with a key, checkpoints written without one are still accepted

ALL = (DIR, EVERY_STEPS, EVERY_SECONDS, KEEP_LAST, RUN_ID, RESTART_COUNT, CONTROL, STOP_DEADLINE, METRICS, ORIGIN,
       RESUME_FROM, RESUME_PARTS, STAGE, RETENTION, REMOTE, REMOTE_ENDPOINT, REMOTE_REGION, REMOTE_VIRTUAL_HOSTED,
       UPLOAD_HOLD, KEY_FILE, ALLOW_UNKEYED, MEMORY_FD, SNAPSHOT_EVERY_STEPS)


def get_int(name: str) -> int | None:
    """Read a positive int from the environment, or None when unset/empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        from .errors import ConfigError

        raise ConfigError(
            f"environment variable {name}={raw!r} is not an integer; unset it or give a whole number") from None
    return value


def get_float(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        from .errors import ConfigError

        raise ConfigError(
            f"environment variable {name}={raw!r} is not a number; unset it or give seconds as a number") from None
