"""Child of scripts/syscall_sweep.py: import everything, say ready, wait for "go", run one operation.

usage: sweep_child.py ROOT OP    OP: save | retention | prune
Exit 0 on success; on a storage error one line on stderr and exit 5 (prune: the CLI's own exit code).
"""

import mmap
import os
import sys

from ckptd import cli, retention, store
from ckptd.errors import CkptdError, StorageError

root, op = sys.argv[1], sys.argv[2]
data = mmap.mmap(-1, 3 * store.ALIGN + 100)  # page-aligned, with an unaligned tail
data.write(bytes(range(256)) * (len(data) // 256))
header = store.safetensors_header_bytes([("w", "U8", [len(data)], len(data))], align=store.ALIGN)
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.readline()  # strace attaches here
try:
    if op == "save":
        with store.PendingCheckpoint(root, 3) as p:
            p.write_aligned(store.TENSORS, header, memoryview(data))
            p.write_file(store.STATE, [b'{"step": 3}'])
            p.commit(kind="periodic")
        code = 0
    elif op == "retention":
        try:  # as the Checkpointer's writer and the supervisor call it: an OSError skips this round
            retention.apply(root, retention.Policy(keep_last=1))
            code = 0
        except OSError as exc:
            sys.stderr.write(f"ckptd: retention skipped: {exc}\n")
            code = 5
    else:
        code = cli.main(["prune", "--keep-last", "1", root])
except StorageError as exc:
    sys.stderr.write(f"storage error: {exc}\n")
    code = 5
except CkptdError as exc:
    sys.stderr.write(f"error: {exc}\n")
    code = 1
os._exit(code)
