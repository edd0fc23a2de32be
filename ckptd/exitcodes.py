"""Exit codes of every ckptd command and of a trainer stopped by ckptd.

They are part of the public contract (README, "Exit codes"): scripts and
schedulers (SLURM requeue, Kubernetes restart policies) branch on them.
"""

OK = 0
FAILURE = 1  # an operation failed for a reason named on stderr
USAGE = 2  # bad command-line arguments (argparse uses 2 as well)
INVALID = 3  # verify found at least one invalid checkpoint
NOT_FOUND = 4  # a named directory, checkpoint or file does not exist
STORAGE = 5  # a storage error (ENOSPC, EIO, EDQUOT, ...) aborted the operation
LOCKED = 6  # another supervisor already owns this checkpoint directory
NOT_RUNNING = 7  # no running supervisor to talk to
GAVE_UP = 70  # restart budget spent or the same step crashed too often
CONFIG = 78  # configuration error (EX_CONFIG); never restarted
PREEMPTED = 85  # stopped on request after an emergency checkpoint was committed
STOPPED_NO_CHECKPOINT = 86  # stopped on request, but no emergency checkpoint was confirmed

DESCRIPTIONS = {
    OK: "success; for `ckptd run`, training finished",
    FAILURE: "operation failed (reason on stderr)",
    USAGE: "bad command-line arguments",
    INVALID: "`ckptd verify` found an invalid checkpoint",
    NOT_FOUND: "directory, checkpoint or file not found",
    STORAGE: "storage error aborted the operation; nothing was published",
    LOCKED: "another `ckptd run` owns this checkpoint directory",
    NOT_RUNNING: "no running `ckptd run` for this directory",
    GAVE_UP: "`ckptd run` gave up: restart budget spent or the same step kept crashing",
    CONFIG: "configuration error; nothing was started",
    PREEMPTED: "stopped on request after an emergency checkpoint was committed",
    STOPPED_NO_CHECKPOINT: "stopped on request; no emergency checkpoint was confirmed (the log says why)",
}
