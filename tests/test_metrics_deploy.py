"""deploy/prometheus and deploy/grafana: the scrape configs and alert rules pass promtool, every alert has a
unit test that passes `promtool test rules`, and the committed dashboard is exactly what its generator produces,
with every panel's PromQL valid."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from fixtures.prom import PROMTOOL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROM_DIR = os.path.join(ROOT, "deploy", "prometheus")
GRAFANA_DIR = os.path.join(ROOT, "deploy", "grafana")
sys.path.insert(0, GRAFANA_DIR)

needs_promtool = pytest.mark.skipif(not PROMTOOL and not os.environ.get("CI"),
                                    reason="needs promtool (apt-get install prometheus); .ci/run installs it")


def promtool(*args: str, cwd: str = PROM_DIR) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool is missing: .ci/run installs the Debian package prometheus"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


@needs_promtool
def test_alert_rules_and_scrape_configs_pass_promtool():
    r = promtool("check", "rules", "ckptd-alerts.yml")
    assert r.returncode == 0 and "SUCCESS: 7 rules found" in r.stdout and "WARNING" not in r.stdout + r.stderr, r
    for config in ("prometheus-static.yml", "prometheus-file-sd.yml"):
        r = promtool("check", "config", config)
        assert r.returncode == 0 and "is valid prometheus config file syntax" in r.stdout, r


@needs_promtool
def test_every_alert_has_a_unit_test_and_the_unit_tests_pass():
    with open(os.path.join(PROM_DIR, "ckptd-alerts.yml")) as f:
        alerts = {rule["alert"] for group in yaml.safe_load(f)["groups"] for rule in group["rules"]}
    with open(os.path.join(PROM_DIR, "ckptd-alerts.test.yml")) as f:
        tests = yaml.safe_load(f)["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for t in tests for case in t["alert_rule_test"] if not case["exp_alerts"]}
    assert fired == alerts and quiet == alerts  # each alert shown firing and shown staying quiet
    r = promtool("test", "rules", "ckptd-alerts.test.yml")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_the_committed_dashboard_is_what_the_generator_produces():
    pytest.importorskip("grafana_foundation_sdk", reason="test-only dependency: pip install -e '.[test]'")
    import generate

    with open(os.path.join(GRAFANA_DIR, "ckptd.json"), encoding="utf-8") as f:
        assert f.read() == generate.render(), "run: python deploy/grafana/generate.py"
    r = subprocess.run([sys.executable, os.path.join(GRAFANA_DIR, "generate.py"), "--check"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_dashboard_is_importable_shaped_with_job_and_instance_variables():
    with open(os.path.join(GRAFANA_DIR, "ckptd.json"), encoding="utf-8") as f:
        board = json.load(f)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["query"] == "label_values(ckptd_info, job)"
    assert "$job" in variables["instance"]["query"] and variables["instance"]["includeAll"]
    assert board["uid"] == "ckptd-runs" and board["schemaVersion"] >= 36  # Grafana 10+
    titles = [p["title"] for p in board["panels"]]
    for wanted in ("Run state", "Step rate", "Checkpoint age", "Save duration (request to durable commit)",
                   "Loop stall per save", "Restarts and preemption notices", "Lost steps", "Goodput",
                   "Training loss"):
        assert wanted in titles
    for p in board["panels"]:
        assert p["type"] in ("timeseries", "stat") and p["datasource"]["uid"] == "${datasource}"
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"])
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
        assert all('job=~"$job"' in t["expr"] and 'instance=~"$instance"' in t["expr"] for t in p["targets"])


@needs_promtool
def test_every_dashboard_expression_is_valid_promql(tmp_path):
    with open(os.path.join(GRAFANA_DIR, "ckptd.json"), encoding="utf-8") as f:
        board = json.load(f)
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"ckptd:dashboard_expr_{i}", "expr": e.replace("$__rate_interval", "1m")
         .replace("$job", "ckptd").replace("$instance", ".*")} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = promtool("check", "rules", str(path), cwd=str(tmp_path))
    assert r.returncode == 0 and f"SUCCESS: {len(exprs)} rules found" in r.stdout, r.stdout + r.stderr
