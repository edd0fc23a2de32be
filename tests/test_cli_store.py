"""ckptd ls / verify / inspect / prune / export through the real entry point."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import ckptd_cli


def test_ls_json_lists_every_checkpoint_with_documented_fields(make_checkpoints):
    root = make_checkpoints([10, 9, 100], kinds={100: "emergency"})
    r = ckptd_cli("ls", root, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["step"] for row in rows] == [9, 10, 100]
    for row in rows:
        assert {"step", "path", "kind", "bytes", "created", "valid", "metrics"} <= set(row)
        assert row["valid"] is True and row["bytes"] > 0 and "loss" in row["metrics"]
        assert os.path.isdir(row["path"])
    assert rows[-1]["kind"] == "emergency"


def test_ls_text_shows_a_row_per_checkpoint_and_invalid_ones(make_checkpoints):
    root = make_checkpoints([1, 2])
    os.unlink(os.path.join(root, "step-000000000002", "state.json"))
    r = ckptd_cli("ls", root)
    assert r.returncode == 0
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["NAME", "STEP", "KIND"] and len(lines) == 3
    assert lines[2].startswith("step-000000000002") and "BAD" in lines[2] and "state.json is missing" in lines[2]


def test_ls_names_its_column_for_the_manifest_check_so_damaged_data_is_not_shown_as_valid(make_checkpoints):
    """A flipped byte in the tensor data: the manifest check passes (`ls` reads no data), `verify` says INVALID.
    `ls` must not call that checkpoint valid: its column says what it checked."""
    root = make_checkpoints([1])
    ckpt = os.path.join(root, "step-000000000001")
    with open(os.path.join(ckpt, "tensors.safetensors"), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    assert "INVALID" in ckptd_cli("verify", ckpt).stdout
    lines = ckptd_cli("ls", root).stdout.splitlines()
    header = lines[0].split()
    assert "VALID" not in header and header[5] == "MANIFEST", lines
    at = lines[0].index("MANIFEST")
    assert lines[1][at:].split()[0] == "ok", lines
    assert "manifest-level check" in ckptd_cli("ls", "--help").stdout


def test_verify_single_checkpoint_and_json(make_checkpoints):
    root = make_checkpoints([3])
    r = ckptd_cli("verify", os.path.join(root, "step-000000000003"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["valid"] is True


def test_inspect_shows_tensors_state_and_manifest(make_checkpoints):
    root = make_checkpoints([3])
    r = ckptd_cli("inspect", os.path.join(root, "step-000000000003"))
    assert r.returncode == 0, r.stderr
    assert "model/0.weight" in r.stdout and "F32" in r.stdout and "[16, 8]" in r.stdout
    assert "progress/step = 3" in r.stdout and '"format": "ckptd/1"' in r.stdout
    j = json.loads(ckptd_cli("inspect", os.path.join(root, "step-000000000003"), "--json").stdout)
    assert j["tensors"]["model/0.weight"] == {"dtype": "F32", "shape": [16, 8]} and j["manifest"]["step"] == 3


def test_inspect_json_gives_the_state_as_json_values(make_checkpoints):
    root = make_checkpoints([3])
    j = json.loads(ckptd_cli("inspect", os.path.join(root, "step-000000000003"), "--json").stdout)
    state = j["state"]
    assert isinstance(state, dict), state
    assert state["progress/step"] == 3 and state["progress/epoch"] is None and state["metrics/loss"] == 0.25
    [group] = state["optimizer/param_groups"]
    assert group["lr"] == 0.01 and group["params"] == [0, 1, 2, 3] and group["betas"] == {"__tuple": [0.9, 0.999]}
    assert not any(isinstance(v, str) and " = " in v for v in state.values()), state
    assert "model/0.weight" not in state  # tensors are listed under "tensors"


def test_prune_dry_run_then_real(make_checkpoints):
    root = make_checkpoints([1, 2, 3, 4],
                            metrics={1: {"loss": 0.1}, 2: {"loss": 0.5}, 3: {"loss": 0.4}, 4: {"loss": 0.3}})
    r = ckptd_cli("prune", root, "--keep-last", "1", "--keep-best", "loss:1:min", "--dry-run")
    assert r.returncode == 0 and "would delete step-000000000002" in r.stdout
    assert len(os.listdir(root)) == 4
    r = ckptd_cli("prune", root, "--keep-last", "1", "--keep-best", "loss:1:min", "--json")
    assert sorted(json.loads(r.stdout)["deleted"]) == ["step-000000000002", "step-000000000003"]
    assert sorted(os.listdir(root)) == ["step-000000000001", "step-000000000004"]


def test_export_is_loadable_by_safetensors_alone(make_checkpoints, tmp_path):
    from safetensors.torch import load_file

    import ckptd

    root = make_checkpoints([5])
    out = tmp_path / "model.safetensors"
    r = ckptd_cli("export", os.path.join(root, "step-000000000005"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    weights = load_file(str(out))
    state = ckptd.load_state(os.path.join(root, "step-000000000005"))["model"]
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[k], state[k]) for k in weights)
    assert ckptd_cli("export", os.path.join(root, "step-000000000005"), "-o", str(out)).returncode == 1


@pytest.mark.parametrize("argv, code, text", [
    (["ls", "/nonexistent/dir"], 4, "does not exist"),
    (["verify", "/nonexistent/dir"], 4, "does not exist"),
    (["prune", "/tmp", "--keep-last", "0"], 2, "must be >= 1"),
    (["prune", "/tmp"], 2, "prune needs a rule"),
    (["prune", "/tmp", "--keep-best", "loss"], 2, "METRIC:K"),
    (["inspect"], 2, "required"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_bad_input_gives_one_line_and_documented_code(argv, code, text):
    r = ckptd_cli(*argv)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and text in r.stderr and "Traceback" not in r.stderr


def test_inspect_of_corrupt_checkpoint_names_the_problem(make_checkpoints):
    root = make_checkpoints([1])
    os.unlink(os.path.join(root, "step-000000000001", "manifest.json"))
    r = ckptd_cli("inspect", os.path.join(root, "step-000000000001"))
    assert r.returncode == 3 and "manifest.json is missing" in r.stderr


def test_every_command_has_help():
    from ckptd.cli import COMMANDS

    for module in COMMANDS:
        cmd = module.replace("_", "-")  # ckptd/commands/install_unit.py is `ckptd install-unit`
        r = ckptd_cli(cmd, "--help")
        assert r.returncode == 0 and "usage: ckptd " + cmd in r.stdout, cmd


def test_progress_is_quiet_when_piped(make_checkpoints, tmp_path):
    root = make_checkpoints([1])
    r = ckptd_cli("export", os.path.join(root, "step-000000000001"), "-o", str(tmp_path / "m.safetensors"))
    assert r.stderr == "" and "\r" not in r.stdout


def test_progress_draws_on_a_terminal():
    import io

    from ckptd.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    with Progress("verify", 100, stream=s) as p:
        p(50)
    assert "verify [" in s.getvalue() and "100.0%" not in s.getvalue().split("\r")[0]
    assert s.getvalue().endswith("\n")


def test_pin_protects_from_prune_and_unpin_lifts_it(make_checkpoints):
    root = make_checkpoints([1, 2, 3])
    assert ckptd_cli("pin", os.path.join(root, "step-000000000001")).returncode == 0
    assert json.loads(ckptd_cli("ls", root, "--json").stdout)[0]["pinned"] is True
    ckptd_cli("prune", root, "--keep-last", "1")
    assert sorted(os.listdir(root)) == [".pins", "step-000000000001", "step-000000000003"]
    assert ckptd_cli("pin", "--remove", os.path.join(root, "step-000000000001")).returncode == 0
    ckptd_cli("prune", root, "--keep-last", "1")
    assert sorted(os.listdir(root)) == [".pins", "step-000000000003"]
