"""systemd/ckptd@.service and `ckptd install-unit`, without a running service manager.

`systemd-analyze verify` must print nothing on stderr (it exits 0 on unknown keys and only warns);
`systemd-analyze security --offline=yes` must rate the unit at most 4.0 and match the figure in docs/systemd.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from ckptd import exitcodes
from ckptd.commands import install_unit
from ckptd.errors import ConfigError
from ckptd.supervisor.config import Config
from fixtures.sup_helpers import TRAINER
from fixtures.systemd_user import under_tmp_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT_FILE = os.path.join(ROOT, "systemd", "ckptd@.service")
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed (Debian package `systemd`; .ci/run "
                                   "installs it)")


def keys(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value given, in order (systemd keys repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def seconds(text: str) -> float:
    units = {"s": 1, "min": 60, "h": 3600, "ms": 1e-3}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|min|h)?", text)
    assert m, text
    return float(m[1]) * units[m[2] or "s"]


def rendered(tmp_path, manager: str = "system") -> str:
    path = tmp_path / "ckptd@.service"
    path.write_text(install_unit.render_unit(manager))
    return str(tmp_path / "ckptd@job.service")


@needs_analyze
@pytest.mark.parametrize("manager", ["system", "user"])
def test_unit_passes_systemd_analyze_verify_with_nothing_on_stderr(tmp_path, manager):
    args = ["systemd-analyze", *(["--user"] if manager == "user" else []), "verify", rendered(tmp_path, manager)]
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    assert r.returncode == 0 and r.stderr == "", r.stderr


@needs_analyze
def test_security_exposure_is_at_most_4_and_is_the_figure_in_the_docs(tmp_path):
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", rendered(tmp_path)], capture_output=True,
                       text=True)
    m = re.search(r"Overall exposure level for ckptd@job\.service: (\d+\.\d) (\w+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    score = float(m[1])
    assert score <= 4.0 and m[2] == "OK"
    with open(os.path.join(ROOT, "docs", "systemd.md")) as f:
        assert f"exposure level {m[1]} OK" in f.read(), f"docs/systemd.md does not record the measured {m[1]}"


def test_unit_speaks_notify_stops_gently_and_maps_ckptds_exit_codes():
    with open(UNIT_FILE) as f:
        k = keys(f.read())
    one = {name: values[-1] for name, values in k.items()}
    assert one["Service.Type"] == "notify" and one["Service.NotifyAccess"] == "main"
    assert one["Service.ExecStart"].startswith(install_unit.PLACEHOLDER + " run --config %E/ckptd/%i.yaml ")
    assert one["Service.KillMode"] == "mixed"  # SIGTERM to ckptd only; it handles the trainer
    assert seconds(one["Service.TimeoutStopSec"]) >= Config().grace + 10
    assert one["Service.SuccessExitStatus"] == str(exitcodes.PREEMPTED)
    assert str(exitcodes.CONFIG) in one["Service.RestartPreventExitStatus"].split()
    assert one["Service.Restart"] == "on-failure" and seconds(one["Service.RestartSec"]) > 0
    assert "Unit.StartLimitBurst" in one and "Unit.StartLimitIntervalSec" in one
    assert seconds(one["Service.WatchdogSec"]) >= 600  # above a sensible hang_timeout and slow first steps
    assert one["Install.WantedBy"] == "multi-user.target"


def test_unit_is_sandboxed_but_keeps_gpus_reachable():
    with open(UNIT_FILE) as f:
        k = keys(f.read())
    one = {name: values[-1] for name, values in k.items()}
    assert one["Service.DynamicUser"] == "yes" and one["Service.StateDirectory"] == "ckptd/%i"
    assert one["Service.NoNewPrivileges"] == "yes" and one["Service.CapabilityBoundingSet"] == ""
    assert (one["Service.ProtectSystem"], one["Service.ProtectHome"], one["Service.PrivateTmp"]) == \
        ("strict", "yes", "yes")
    assert "Service.PrivateDevices" not in one  # it would hide /dev/nvidia*
    assert one["Service.DevicePolicy"] == "closed"
    assert {"char-nvidia-frontend rw", "char-nvidia-uvm rw"} <= set(k["Service.DeviceAllow"])


def test_packaged_unit_is_the_repositorys(tmp_path):
    with open(install_unit.TEMPLATE) as a, open(UNIT_FILE) as b:
        assert a.read() == b.read()


def test_rendered_unit_runs_this_ckptd_and_a_user_unit_drops_only_what_a_user_manager_forces():
    system, user = install_unit.render_unit("system"), install_unit.render_unit("user")
    exe = install_unit.ckptd_executable()
    assert f"ExecStart={exe} run --config %E/ckptd/%i.yaml $CKPTD_COMMAND" in system
    diff = set(system.splitlines()) ^ set(user.splitlines())
    assert diff == {"DynamicUser=yes", "WantedBy=multi-user.target", "WantedBy=default.target"}


# --- ckptd install-unit ------------------------------------------------------------------------------------


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckptd", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("grace: 20\nhang_timeout: 600\n")
    return str(path)


UNDER_TMP = under_tmp_reason()
outside_tmp = pytest.mark.skipif(UNDER_TMP is not None, reason=str(UNDER_TMP))


@outside_tmp
def test_install_unit_dry_run_prints_the_plan_and_changes_nothing(tmp_path, config):
    image = tmp_path / "image"
    r = cli("install-unit", "job", "--config", config, "--root", str(image), "--dry-run", TRAINER, "--steps", "5")
    assert r.returncode == 0, r.stderr
    assert f"would write {image}/etc/ckptd/job.yaml" in r.stdout
    assert f"would run systemctl --root={image} enable ckptd@job.service" in r.stdout
    assert not image.exists()
    r = cli("install-unit", "job", "--config", config, "--dry-run", "--json", TRAINER)
    plan = json.loads(r.stdout)
    assert plan["dry_run"] and plan["manager"] == "system" and plan["unit"] == "ckptd@job.service"
    assert "/etc/ckptd/job.yaml" in plan["files"] and "/etc/systemd/system/ckptd@.service" in plan["files"]
    assert plan["commands"] == [["systemctl", "daemon-reload"], ["systemctl", "enable", "ckptd@job.service"]]


@outside_tmp
@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl is not installed (Debian package `systemd`)")
def test_install_unit_into_an_image_writes_config_command_unit_and_enables_it(tmp_path, config):
    image = tmp_path / "image"
    r = cli("install-unit", "job", "--config", config, "--root", str(image), TRAINER, "--steps", "5")
    assert r.returncode == 0, r.stderr
    etc = image / "etc"
    assert (etc / "ckptd" / "job.yaml").read_text() == open(config).read()
    env = etc / "ckptd" / "job.env"
    assert f"CKPTD_COMMAND='{TRAINER} --steps 5'" in env.read_text()
    assert oct(env.stat().st_mode & 0o777) == "0o600"  # systemd reads it; it may hold the job's secrets
    assert (etc / "systemd" / "system" / "ckptd@.service").read_text() == install_unit.render_unit("system")
    link = etc / "systemd" / "system" / "multi-user.target.wants" / "ckptd@job.service"
    assert os.readlink(link) == "/etc/systemd/system/ckptd@.service"  # enabled: it starts at every boot


def test_install_unit_checks_the_config_first_and_writes_nothing_when_it_is_bad(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grace: 20\ngrase: 3\n")
    image = tmp_path / "image"
    r = cli("install-unit", "job", "--config", str(bad), "--root", str(image), TRAINER)
    assert r.returncode == exitcodes.CONFIG
    assert "bad.yaml:2: unknown key 'grase'; did you mean 'grace'?" in r.stderr
    assert not image.exists()


@pytest.mark.parametrize("words, message", [
    (["bad/name", "--config", "{cfg}", TRAINER], "job name"),
    (["job", TRAINER], "--config FILE is required"),
    (["job", "--config", "{cfg}"], "no script given"),
    (["job", "--config", "{cfg}", TRAINER, "--name", "two words"], "splits the command at spaces"),
    (["job", "--config", "{cfg}", TRAINER, "--name", "a\x1b[2Jb"], "control character"),
    (["job", "--config", "{cfg}", "--run-as", "root", TRAINER], "an account of its own"),
    (["job", "--config", "{abs}", TRAINER], "give --run-as USER"),
    (["job", "--config", "{cfg}", "{tmp_script}"], "does not see (PrivateTmp=yes)"),
])
def test_install_unit_refuses_what_the_service_could_not_run(tmp_path, config, words, message):
    absolute = tmp_path / "abs.yaml"
    absolute.write_text(f"dir: {tmp_path}/ckpts\n")
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    words = [w.format(cfg=config, abs=absolute, tmp_script=script) for w in words]
    r = cli("install-unit", words[0], "--root", str(tmp_path / "image"), *words[1:])
    assert r.returncode == exitcodes.USAGE, r.stdout + r.stderr
    assert message in r.stderr
    assert not (tmp_path / "image").exists()


INJECTION = 'dir: "/srv/ck\\n[Service]\\nExecStartPre=+/bin/sh -c \\"id > /root/pwned\\"\\nUser=root"\n'


def _run_as_account() -> str:
    """An existing account that is not root or nobody (install-unit refuses those for --run-as)."""
    import pwd

    for entry in pwd.getpwall():
        if entry.pw_uid not in (0, 65534) and entry.pw_name.isidentifier():
            return entry.pw_name
    pytest.skip("no account other than root and nobody to run the unit as")


def test_a_config_value_with_a_newline_never_becomes_unit_directives(tmp_path):
    bad = tmp_path / "j.yaml"
    bad.write_text(INJECTION)
    image = tmp_path / "image"
    r = cli("install-unit", "job", "--root", str(image), "--run-as", _run_as_account(), "--config", str(bad),
            TRAINER)
    assert r.returncode == exitcodes.CONFIG, r.stdout + r.stderr  # was: 0, and a drop-in with User=root
    assert "j.yaml:1: key 'dir'" in r.stderr and "control character" in r.stderr
    assert r.stderr.count("\n") == 1  # the value is shown escaped, on the one line
    assert not image.exists()


def test_unit_word_quotes_and_escapes_by_systemds_rules_and_refuses_control_characters():
    word = install_unit.unit_word
    assert word("dir", "/srv/ck") == "/srv/ck"
    assert word("dir", "/srv/my ck") == '"/srv/my ck"'
    assert word("dir", '/srv/a"b\\c') == '"/srv/a\\"b\\\\c"'
    assert word("dir", "/srv/100%n") == "/srv/100%%n"
    assert word("exe", "/opt/$HOME/ckptd", exec_line=True) == "/opt/$$HOME/ckptd"
    for bad in ("/srv/ck\n[Service]", "/srv/\rx", "/srv/\x1b[31m", "/srv/\x00", "/srv/\x85"):
        with pytest.raises(ConfigError, match="control character") as e:
            word("j.yaml: key 'dir'", bad)
        assert e.value.exit_code == exitcodes.CONFIG and "j.yaml: key 'dir'" in str(e.value)


@outside_tmp
@needs_analyze
@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl is not installed (Debian package `systemd`)")
def test_a_strange_but_legal_dir_reaches_the_drop_in_quoted_and_systemd_reads_it_as_one_path(tmp_path):
    strange = '/srv/my ckpts/100%n "q" \\ x;y'
    cfg = tmp_path / "j.yaml"
    cfg.write_text(yaml.safe_dump({"dir": strange}))
    image = tmp_path / "image"
    account = _run_as_account()
    r = cli("install-unit", "job", "--root", str(image), "--run-as", account, "--config", str(cfg), TRAINER)
    assert r.returncode == 0, r.stderr
    unit_dir = image / "etc" / "systemd" / "system"
    dropin = (unit_dir / "ckptd@job.service.d" / "50-install-unit.conf").read_text()
    got = keys(dropin)
    assert set(got) == {"Unit.RequiresMountsFor", "Service.DynamicUser", "Service.User", "Service.ReadWritePaths",
                        *(["Service.ProtectHome"] if "Service.ProtectHome" in got else [])}, dropin
    # systemd parses every line: a value it split at a blank, or whose quote or specifier it could not read,
    # would be a warning on stderr ("Not an absolute path", "Failed to resolve specifiers", "Invalid syntax")
    r = subprocess.run(["systemd-analyze", "verify", str(unit_dir / "ckptd@job.service")], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert got["Service.User"] == [account]
    assert got["Service.ReadWritePaths"] == got["Unit.RequiresMountsFor"] == ['"/srv/my ckpts/100%%n \\"q\\" \\\\ x;y"']
