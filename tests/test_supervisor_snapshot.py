"""What `ckptd status` is served (supervisor/snapshot.py), and the supervisor's layering: in-process."""

from __future__ import annotations

import ast
import json
import os
import pathlib

import pytest

import ckptd.supervisor
from ckptd.supervisor.snapshot import SEED_BYTES, StatusBoard


def test_the_published_snapshot_cannot_be_changed_and_does_not_follow_the_source():
    board = StatusBoard()
    status = {"state": "running", "trainers": [{"pid": 1}], "last_checkpoint": {"name": "step-1"}}
    snap = board.publish(status)
    status["state"] = "stopping"
    status["last_checkpoint"]["name"] = "step-2"
    assert snap["state"] == "running" and snap["last_checkpoint"]["name"] == "step-1"
    with pytest.raises(TypeError):
        snap["state"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError):
        snap["last_checkpoint"]["name"] = "x"  # type: ignore[index]
    with pytest.raises(AttributeError):
        snap["trainers"].append({"pid": 2})  # type: ignore[attr-defined]


def test_the_answer_is_plain_json_with_the_recent_events_bounded():
    board = StatusBoard(recent=3)
    for i in range(10):
        board.note({"event": "spawn", "pid": i})
    answer = board.serve({"state": "running", "trainers": [{"pid": 1, "rank": 0}], "notice": None})
    assert json.loads(json.dumps(answer)) == answer
    assert answer["trainers"] == [{"pid": 1, "rank": 0}]
    assert [e["pid"] for e in answer["recent_events"]] == [7, 8, 9]
    assert board.snapshot["state"] == "running"


def test_recent_events_start_with_the_end_of_an_earlier_journal(tmp_path):
    path = tmp_path / "journal.jsonl"
    big = "x" * 200
    lines = [json.dumps({"event": "old", "n": i, "pad": big}) for i in range(2000)]  # far over SEED_BYTES
    path.write_text("\n".join(lines) + "\n" + '{"event": "torn"')  # a crash mid-write: a torn last line
    assert path.stat().st_size > SEED_BYTES
    board = StatusBoard(recent=5)
    board.seed(str(path))
    assert [e["n"] for e in board.recent()] == [1995, 1996, 1997, 1998, 1999]


def test_seeding_never_waits_on_a_fifo_nor_follows_a_link(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    board = StatusBoard()
    board.seed(str(fifo))  # returns at once: opened non-blocking, not a regular file
    target = tmp_path / "target"
    target.write_text(json.dumps({"event": "secret"}) + "\n")
    (tmp_path / "link").symlink_to(target)
    board.seed(str(tmp_path / "link"))
    board.seed(str(tmp_path / "missing"))
    assert board.recent() == []


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_supervisor_never_imports_the_command_line():
    """Layers import downward: commands depend on the supervisor, never the reverse."""
    package = pathlib.Path(ckptd.supervisor.__file__).parent
    offenders = {p.name: sorted(m for m in _imports(p) if "commands" in m or m in ("..cli", "ckptd.cli"))
                 for p in package.glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_core_imports_nothing_that_does_io():
    """core.py and the modules it decides with import no process, socket, journal or metrics code."""
    package = pathlib.Path(ckptd.supervisor.__file__).parent
    pure = ("core", "stopping", "messages", "ledger", "actions")
    io_modules = {".process", ".child", ".journal", ".metrics", ".endpoint", ".loop", ".checkpoints", ".watch",
                  ".schedule", ".notify", ".rundir", "socket", "selectors", "subprocess", "time"}
    for name in pure:
        assert not _imports(package / f"{name}.py") & io_modules, name
