"""supervisor/config.py: one schema for YAML and CLI; errors name the key and line; `ckptd config`."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from ckptd import exitcodes
from ckptd.errors import ConfigError
from ckptd.supervisor.config import OPTIONS, SECTIONS, Config, resolve
from fixtures.sup_helpers import PLAIN, ckptd

pytestmark = pytest.mark.kind("unit")  # the tests marked kind("system") start processes


def write(tmp_path, text):
    p = tmp_path / "ckptd.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_file_and_command_line_merge_with_the_command_line_winning(tmp_path):
    path = write(tmp_path, "every_steps: 100\ngrace: 10\nkeep_best: [loss:2:min]\n")
    cfg = resolve(path, {"grace": "3", "keep_last": "4"})
    assert (cfg.every_steps, cfg.grace, cfg.keep_last, cfg.keep_best) == (100, 3.0, 4, (("loss", 2, "min"),))
    assert cfg.max_restarts == Config().max_restarts


def test_every_option_has_a_config_key_and_a_flag():
    keys = {o.key for o in OPTIONS}
    assert {k.split(".")[0] for k in keys} == set(Config.__dataclass_fields__)
    for section in SECTIONS:  # sections (notices:, slurm:) have one dotted key per field
        assert {k for k in keys if k.startswith(section + ".")} == {
            f"{section}.{f}" for f in getattr(Config(), section).__dataclass_fields__}
    for flag in ("--dir", "--every-steps", "--every", "--cron", "--keep-last", "--grace", "--max-restarts",
                 "--restart-window", "--hang-timeout", "--metrics-addr", "--log-format"):
        assert flag in {o.cli for o in OPTIONS}


@pytest.mark.parametrize("text, words", [
    ("grace: 5\nevry_steps: 3\n", [".yaml:2:", "unknown key 'evry_steps'", "did you mean 'every_steps'"]),
    ("every_steps: ten\n", [".yaml:1:", "every_steps", "whole number"]),
    ("max_restarts: true\n", ["max_restarts", "whole number"]),
    ("grace: -1\n", ["grace", "> 0"]),
    ("cron: 'every day'\n", ["cron", "crontab"]),
    ("log_format: xml\n", ["log_format", "text, json"]),
    ("metrics:\n  addr: 'host:99999'\n", [".yaml:2:", "metrics.addr", "port"]),
    ("requeue_signal: KILL\n", ["requeue_signal", "USR1"]),
    ("grace: 1\ngrace: 2\n", [".yaml:2:", "appears twice", "first on line 1"]),
    ("- a\n- b\n", ["mapping"]),
    ("grace: [\n", ["not valid YAML"]),
    ("keep_best: [loss]\n", ["keep_best", "METRIC:K"]),
    ("every: 1e-9\n", [".yaml:1:", "every", ">= 1 s"]),
    ("every: 0.5\n", ["every", ">= 1 s"]),
])
def test_bad_file_values_are_config_errors_naming_the_key_and_line(tmp_path, text, words):
    with pytest.raises(ConfigError) as err:
        resolve(write(tmp_path, text), {})
    for w in words:
        assert w in str(err.value)
    assert err.value.exit_code == exitcodes.CONFIG


def test_bad_command_line_values_name_the_flag():
    with pytest.raises(ConfigError, match="option --hang-timeout"):
        resolve(None, {"hang_timeout": "soon"})
    with pytest.raises(ConfigError, match="backoff_max"):
        resolve(None, {"backoff_base": "10", "backoff_max": "1"})


@pytest.mark.kind("system")
def test_a_bad_value_on_the_command_line_is_a_usage_error_and_in_the_file_a_config_error(tmp_path):
    """Exit 2 for `--grace -1` (like every other bad argument), 78 for `grace: -1` in the --config file."""
    with pytest.raises(ConfigError) as err:
        resolve(None, {"grace": "-1"})
    assert err.value.exit_code == exitcodes.USAGE
    with pytest.raises(ConfigError) as err:
        resolve(write(tmp_path, "backoff_base: 10\n"), {"backoff_max": "1"})
    assert err.value.exit_code == exitcodes.USAGE
    assert resolve(None, {"every": "1"}).every == 1.0
    marker = tmp_path / "started"
    root = tmp_path / "ck"
    for extra, code in (([], exitcodes.CONFIG), (["--grace", "-1"], exitcodes.USAGE),
                        (["--every", "1e-9"], exitcodes.USAGE)):
        config = ["--config", write(tmp_path, "grace: -1\n")] if not extra else []
        r = ckptd("run", *config, *extra, "--dir", str(root), PLAIN, "--crash-first", str(marker))
        assert r.returncode == code, (extra, r.stderr)
        assert r.stderr.count("\n") == 1 and ("option --" if extra else ".yaml:1: key 'grace'") in r.stderr
    assert not marker.exists() and not root.exists()


def test_metrics_addr_host_defaults_to_localhost_and_off_disables(tmp_path):
    assert resolve(None, {}).metrics.addr == "127.0.0.1:9477"
    assert resolve(None, {"metrics.addr": "9464"}).metrics.addr == "127.0.0.1:9464"
    assert resolve(None, {"metrics.addr": ":9464"}).metrics.addr == "127.0.0.1:9464"
    assert resolve(None, {"metrics.addr": "0.0.0.0:80"}).metrics.addr == "0.0.0.0:80"
    assert resolve(None, {"metrics.addr": "off"}).metrics.addr is None
    assert resolve(write(tmp_path, "metrics:\n  addr: off\n  linger: 5\n"), {}).metrics.addr is None


@pytest.mark.kind("system")
def test_config_check_and_show(tmp_path):
    good = write(tmp_path, "every: 30\ncron: '*/5 * * * *'\n")
    r = ckptd("config", "check", good)
    assert r.returncode == 0 and "OK" in r.stdout
    r = ckptd("config", "show", "--config", good, "--grace", "7")
    shown = yaml.safe_load(r.stdout)
    assert shown["every"] == 30 and shown["grace"] == 7 and shown["cron"] == "*/5 * * * *"
    r = ckptd("config", "show", "--json", "--keep-best", "acc:1:max")
    assert json.loads(r.stdout)["keep_best"] == ["acc:1:max"]
    bad = write(tmp_path, "grace: 1\nbogus: 2\n")
    r = ckptd("config", "check", bad)
    assert r.returncode == exitcodes.CONFIG
    assert r.stderr.count("\n") == 1 and ":2: unknown key 'bogus'" in r.stderr


@pytest.mark.kind("system")
def test_run_with_a_bad_config_prints_one_line_exits_78_and_starts_nothing(tmp_path):
    marker = tmp_path / "started"
    bad = write(tmp_path, "every_steps: 0\n")
    root = tmp_path / "ck"
    r = ckptd("run", "--config", bad, "--dir", str(root), PLAIN, "--crash-first", str(marker))
    assert r.returncode == exitcodes.CONFIG
    assert r.stderr.count("\n") == 1 and "every_steps" in r.stderr and ":1:" in r.stderr
    assert not marker.exists() and not root.exists()


@pytest.mark.kind("system")
def test_run_with_a_missing_script_or_command_fails_before_starting(tmp_path):
    r = ckptd("run", "--dir", str(tmp_path / "ck"), str(tmp_path / "nope.py"))
    assert r.returncode == exitcodes.NOT_FOUND and "-- " in r.stderr
    r = ckptd("run", "--dir", str(tmp_path / "ck"), "--", "no-such-command-xyz")
    assert r.returncode == exitcodes.NOT_FOUND
    assert not os.path.exists(tmp_path / "ck")


# A 456-byte YAML alias bomb (nine anchors, each a list of nine aliases of the previous: 9**9 strings once
# expanded). A real config is a few dozen YAML values.
BOMB = "grace: [&a0 [" + ", ".join(['"lol"'] * 9) + "], " + ", ".join(
    f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)) + "]\n"


def _limit_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # the old code reached 1.8 GB, then MemoryError


@pytest.mark.kind("system")
def test_a_yaml_alias_bomb_is_refused_at_once_with_one_line_and_no_value_expanded(tmp_path):
    import subprocess
    import sys

    path = write(tmp_path, BOMB)
    assert len(BOMB) < 1000
    r = subprocess.run([sys.executable, "-m", "ckptd", "config", "check", path], capture_output=True, text=True,
                       timeout=120, preexec_fn=_limit_memory)
    assert r.returncode == exitcodes.CONFIG, r.stderr[-2000:]  # was: MemoryError traceback, exit 1
    assert r.stderr.count("\n") == 1 and len(r.stderr) < 600, r.stderr[:2000]
    assert "more than 10000 values once its aliases are expanded" in r.stderr
    # the supervisor's SIGHUP reload runs the same resolve(): the same refusal, no expansion
    with pytest.raises(ConfigError, match="aliases"):
        resolve(path, {})


def test_aliases_within_bounds_still_work_and_a_bad_value_is_shown_truncated(tmp_path):
    cfg = resolve(write(tmp_path, "notices:\n  azure_events: &ev [Preempt]\nkeep_best: [&k loss:2:min]\n"), {})
    assert cfg.notices.azure_events == ("Preempt",) and cfg.keep_best == (("loss", 2, "min"),)
    with pytest.raises(ConfigError) as e:
        resolve(write(tmp_path, "grace: [" + ", ".join(["1"] * 5000) + "]\n"), {})
    assert len(str(e.value)) < 300 and "expected seconds as a number" in str(e.value)
    with pytest.raises(ConfigError, match="nested more than 32 levels"):
        resolve(write(tmp_path, "grace: " + "[" * 40 + "]" * 40 + "\n"), {})


@pytest.mark.parametrize("key, text", [
    ("dir", 'dir: "/srv/ck\\n[Service]\\nExecStartPre=+/bin/sh -c \\"id > /root/pwned\\"\\nUser=root"\n'),
    ("dir", 'dir: "/srv/ck\\u001b[31mred"\n'),
    ("metrics.sd_file", 'metrics:\n  sd_file: "/etc/prometheus/sd\\r.json"\n'),
    ("job_id", 'job_id: "a\\nb"\n'),
])
@pytest.mark.kind("system")
def test_config_check_refuses_control_characters_in_paths_and_names_naming_the_key(tmp_path, key, text):
    r = ckptd("config", "check", write(tmp_path, text))
    assert r.returncode == exitcodes.CONFIG, r.stdout + r.stderr  # was: "OK"
    assert f"key '{key}'" in r.stderr and "control character" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.kind("system")
def test_a_sighup_with_an_alias_bomb_keeps_the_config_and_the_supervisor_answers(tmp_path):
    import signal

    from fixtures.sup_helpers import FAST, Run, wait_for

    cfg = tmp_path / "c.yaml"
    cfg.write_text("grace: 5\n")
    root = str(tmp_path / "ck")
    run = Run(tmp_path, root, [*FAST, "--metrics-addr", "off", "--notices", "off", "--config", str(cfg), PLAIN],
              preexec_fn=_limit_memory)
    run.wait_event("spawn")
    cfg.write_text(BOMB)
    run.signal(signal.SIGHUP)
    # was: the loop blocked for ~20 s building the expanded value at 1.8 GB, then a MemoryError traceback
    line = wait_for(lambda: next((x for x in run.stderr().splitlines() if "SIGHUP: keeping the current config" in x),
                                 None), 30, "the reload's refusal")
    assert "aliases are expanded" in line and len(line) < 700, line
    r = ckptd("status", "--dir", root, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "running", r.stdout + r.stderr
    run.signal(signal.SIGTERM)
    run.wait(20)
