"""The store package's shape: its modules import downward only, the supervisor never loads the restore read
engine, and ``store.X`` (use and assignment) reaches the code that defines X."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from ckptd import store
from ckptd.errors import CkptdError
from ckptd.store import writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORE = os.path.join(ROOT, "ckptd", "store")
# lowest first: each module may import only those before it; reader imports none of them
ORDER = ["layout", "auth", "format", "writer", "catalog", "maintenance"]


def _store_imports(name: str) -> set[str]:
    tree = ast.parse(open(os.path.join(STORE, f"{name}.py")).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ckptd.store"):
            out.add(node.module.split(".")[2] if node.module.count(".") >= 2 else "__init__")
        elif isinstance(node, ast.ImportFrom) and node.level == 2 and node.module is None:
            out |= {"__init__" for a in node.names if a.name == "store"}
    return out


def test_store_modules_import_only_the_ones_below_them():
    assert sorted(f[:-3] for f in os.listdir(STORE) if f.endswith(".py")) == sorted(ORDER + ["reader", "__init__"])
    for i, name in enumerate(ORDER):
        assert _store_imports(name) <= set(ORDER[:i]), f"{name} imports {_store_imports(name) - set(ORDER[:i])}"
    assert _store_imports("reader") == set()


SUPERVISOR_SIDE = """
import sys
import ckptd.cli, ckptd.commands, ckptd.retention
import ckptd.supervisor.loop, ckptd.supervisor.rundir, ckptd.supervisor.watch, ckptd.supervisor.control
from ckptd import retention, store
root = sys.argv[1]
infos = store.list_checkpoints(root)
assert infos and store.verify(infos[-1].path).valid and store.latest_valid(root).step == 3
store.pin(root, infos[0].name)
assert retention.apply(root, retention.Policy(keep_last=1)) == [infos[1].name]
store.remove_stale_temps(root)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch imported"
switchers = sorted(n for n, m in list(sys.modules.items()) if m is not None and "_short_switch" in vars(m))
assert not switchers, f"the restore read engine (switch interval) is loaded by {switchers}"
print("ok")
"""


def test_the_supervisor_side_lists_verifies_and_prunes_without_loading_the_restore_read_engine(tmp_path):
    for step in (1, 2, 3):
        with store.PendingCheckpoint(str(tmp_path), step) as p:
            p.write_file(store.STATE, [b"{}"])
            p.commit(kind="periodic")
    r = subprocess.run([sys.executable, "-c", SUPERVISOR_SIDE, str(tmp_path)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


NAMES = """
ALIGN CHUNK CheckpointInfo DCP_JSON DIRECT_CHUNK DIR_MODE DTYPE_SIZES DURING_SWITCH DirCheck FILE_MODE FILE_RE
FIRST_READ FORMAT FileRecord HASH HashPipe KINDS MANIFEST MAX_DCP_JSON_BYTES MAX_DIMS MAX_HEADER_BYTES MAX_IOV
MAX_KEY_CHARS MAX_MANIFEST_BYTES MAX_MANIFEST_DEPTH MAX_STATE_BYTES MAX_STATE_DEPTH MAX_STATE_VALUES MAX_TENSORS
NAME_RE PINS_DIR PREFETCH_PIECE PREVIOUS_DIR Pace PendingCheckpoint Prefetch QUARANTINE_DIR READERS READ_CHUNK
RENAME_EXCHANGE RESOURCE_ERRNOS RESTORE_PREFETCH SHARD_FILE_RE SHARD_SEP STATE TENSORS TMP_PREFIX TRASH_PREFIX
TensorEntry _digest _manifest_problem _short_switch advise_sequential amend_manifest check_metadata check_name
check_structure
checkpoint_name dcp_problem delete digest_bytes fsync_dir fsync_parent_once hash_file inspect_checkpoint is_aligned
iter_checkpoint_paths json_bounds_problem latest_valid list_checkpoints live_writer load_json lower_thread_priority
move_aside new_hasher open_at open_dir parse_safetensors_header pin pinned private_dir quarantine read_dcp_json
read_header_bytes read_into read_manifest read_range read_safetensors_header read_small remove_stale_temps
rename_exchange replace_file replace_file_at replacing replacing_at safetensors_header_bytes shard_file subdir_at
unlink_at unpin unshared_dir verify write_fully
""".split()


@pytest.mark.parametrize("name", NAMES)
def test_every_name_of_the_store_is_reachable_from_the_package(name):
    """The names ckptd, the tests, the benchmarks and the scripts use: the store's interface as one module."""
    assert getattr(store, name) is not None
    namespace: dict = {}
    exec(f"from ckptd.store import {name}", namespace)  # noqa: S102 - a name from NAMES above, no input
    assert namespace[name] is getattr(store, name)


def test_assigning_a_store_name_reaches_the_code_that_uses_it(tmp_path, monkeypatch):
    """A fault injector replaces ``store.rename_exchange``; the commit that replaces a checkpoint calls it."""
    calls = []
    real = store.rename_exchange

    def spy(a: str, b: str) -> None:
        calls.append((a, b))
        real(a, b)

    for replace in (False, True):
        with store.PendingCheckpoint(str(tmp_path), 5) as p:
            p.write_file(store.STATE, [b'{"n": %d}' % replace])
            if replace:
                monkeypatch.setattr(store, "rename_exchange", spy)
            try:
                p.commit(kind="manual", replace=replace)
            except CkptdError as exc:  # a file system that cannot swap (not tmpfs or ext4)
                pytest.skip(str(exc))
    assert len(calls) == 1 and calls[0][1] == os.path.join(str(tmp_path), store.checkpoint_name(5))
    monkeypatch.undo()
    assert writer.rename_exchange is real and store.rename_exchange is real
