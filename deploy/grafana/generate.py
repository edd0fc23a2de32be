"""Generate deploy/grafana/ckptd.json, the Grafana (10+) dashboard for ckptd runs, with grafana-foundation-sdk.

    pip install grafana-foundation-sdk      # build/test-only: ckptd itself never imports it
    python deploy/grafana/generate.py       # rewrites ckptd.json next to this file
    python deploy/grafana/generate.py --check   # exit 1 when ckptd.json differs from what this produces

:data:`PANELS` is the one list of panels and their PromQL: the dashboard, the test that evaluates every
expression against a live Prometheus (tests/test_metrics_prometheus.py) and the picture in docs/metrics.md
(deploy/grafana/render.py) all read it. Metric reference: docs/metrics.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "ckptd.json")
S = '{job=~"$job", instance=~"$instance"}'  # every query's selector: the dashboard's two variables
SL = 'job=~"$job", instance=~"$instance"'  # the same, inside a selector that has more matchers
QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # timeseries | stat
    unit: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    description: str = ""
    width: int = 12


def _quantiles(metric: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"histogram_quantile({q}, sum by (le, instance) (rate({metric}_bucket{S}[$__rate_interval])))",
                  f"{{{{instance}}}} p{int(q * 100)}") for q in QUANTILES)


PANELS: tuple[Panel, ...] = (
    Panel("Run state", "stat", "none", ((f"ckptd_state{S} == 1", "{{instance}}: {{state}}"),),
          "starting, running, stopping, backoff (between restarts), finished, stopped, gave_up", width=8),
    Panel("Trainer process up", "timeseries", "none", ((f"ckptd_child_up{S}", "{{instance}}"),),
          "1 while the training script's process runs", width=8),
    Panel("Goodput", "timeseries", "percentunit", ((f"ckptd_goodput_ratio{S}", "{{instance}}"),),
          "Share of the run's wall time that produced steps still kept (docs/metrics.md)", width=8),
    Panel("Step rate", "timeseries", "none", ((f"rate(ckptd_steps_total{S}[$__rate_interval])", "{{instance}}"),),
          "Training steps per second (recomputed steps included)"),
    Panel("Training step and last checkpoint", "timeseries", "none",
          ((f"ckptd_training_step{S}", "{{instance}} step"),
           (f"ckptd_last_checkpoint_step{S} >= 0", "{{instance}} checkpoint")),
          "The trainer's last reported step, and the step of the newest valid checkpoint"),
    Panel("Checkpoint age", "timeseries", "s",
          ((f"time() - (ckptd_last_checkpoint_timestamp_seconds{S} > 0)", "{{instance}}"),),
          "Seconds since the newest valid checkpoint was committed"),
    Panel("Save duration (request to durable commit)", "timeseries", "s",
          _quantiles("ckptd_checkpoint_duration_seconds"), "Quantiles over the dashboard's rate interval"),
    Panel("Loop stall per save", "timeseries", "s", _quantiles("ckptd_checkpoint_stall_seconds"),
          "Time each save blocked the training loop (the snapshot)"),
    Panel("Restarts and preemption notices", "timeseries", "none",
          ((f"sum by (instance, reason) (increase(ckptd_restarts_total{S}[$__rate_interval]))",
            "{{instance}} restart: {{reason}}"),
           (f"sum by (instance, source) (increase(ckptd_preemption_notices_total{S}[$__rate_interval]))",
            "{{instance}} notice: {{source}}")),
          "Restarts by the reason of the exit; stop signals and cloud notices by source"),
    Panel("Checkpoints and failures", "timeseries", "none",
          ((f"sum by (instance, kind) (increase(ckptd_checkpoints_total{{{SL}, result=\"ok\"}}[$__rate_interval]))",
            "{{instance}} {{kind}}"),
           (f"sum by (instance, reason) (increase(ckptd_checkpoint_failures_total{S}[$__rate_interval]))",
            "{{instance}} failed: {{reason}}"),
           (f"increase(ckptd_remote_upload_failures_total{S}[$__rate_interval])", "{{instance}} remote upload failed")),
          "Committed checkpoints by kind, failures by reason, failed operations of the remote tier's uploader"),
    Panel("Lost steps", "timeseries", "none",
          ((f"ckptd_lost_steps_total{S}", "{{instance}} total"),),
          "Steps computed and then lost: recomputed after a restart"),
    Panel("Training loss", "timeseries", "none",
          ((f"ckptd_train_metric{{{SL}, name=\"loss\"}}", "{{instance}}"),),
          "The 'loss' passed to ck.step(metrics=...), at most once a second"),
    Panel("Emergency checkpoint margin", "timeseries", "s",
          ((f"ckptd_emergency_checkpoint_margin_seconds{S}", "{{instance}}"),),
          "Deadline minus commit time of the last emergency checkpoint; below 0: it was too late"),
    Panel("Valid checkpoints", "timeseries", "none", ((f"ckptd_valid_checkpoints{S}", "{{instance}}"),),
          "Valid checkpoints in the run's directory"),
    Panel("Remote tier lag", "timeseries", "s",
          ((f"ckptd_remote_lag_seconds{S}", "{{instance}}"),),
          "Age of the newest local checkpoint not yet on the object-store tier (--remote); 0: the remote tier holds "
          "it; empty without a remote tier"),
    Panel("Remote uploads", "timeseries", "Bps",
          ((f"rate(ckptd_remote_upload_bytes_total{S}[$__rate_interval])", "{{instance}}"),),
          "Bytes per second committed to the object-store tier (failed uploads: in 'Checkpoints and failures')"),
)


def build() -> dict:
    """The dashboard as plain JSON data."""
    from grafana_foundation_sdk.builders import common as common_builders
    from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, DataSourceRef, VariableRefresh

    ds = DataSourceRef(type_val="prometheus", uid="${datasource}")
    board = (dashboard.Dashboard("ckptd runs").uid("ckptd-runs").tags(["ckptd", "training"])
             .description("Runs supervised by `ckptd run`: state, steps, checkpoints, restarts, goodput, loss. "
                          "Generated by deploy/grafana/generate.py; metric reference: docs/metrics.md.")
             .refresh("30s").time("now-6h", "now").timezone("browser").tooltip(DashboardCursorSync.CROSSHAIR)
             .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
             .with_variable(dashboard.QueryVariable("job").label("Job").datasource(ds)
                            .query("label_values(ckptd_info, job)").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                            .multi(True).include_all(True).all_value(".*"))
             .with_variable(dashboard.QueryVariable("instance").label("Instance").datasource(ds)
                            .query('label_values(ckptd_info{job=~"$job"}, instance)')
                            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                            .multi(True).include_all(True).all_value(".*")))
    for i, p in enumerate(PANELS):
        panel = stat.Panel() if p.kind == "stat" else timeseries.Panel()
        panel = panel.id(i + 1).title(p.title).description(p.description).datasource(ds).unit(p.unit) \
            .height(8).span(p.width)
        for j, (expr, legend) in enumerate(p.queries):
            panel = panel.with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id("ABCDEFGH"[j])
                                      .datasource(ds).range())
        if p.kind == "stat":
            panel = panel.text_mode(common.BigValueTextMode.NAME).color_mode(common.BigValueColorMode.NONE) \
                .graph_mode(common.BigValueGraphMode.NONE) \
                .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        else:
            panel = panel.line_width(1).fill_opacity(10).show_points(common.VisibilityMode.NEVER)
        board = board.with_panel(panel)
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when the committed file differs")
    args = ap.parse_args()
    text = render()
    if args.check:
        with open(OUT, encoding="utf-8") as f:
            same = f.read() == text
        print(f"{OUT}: {'up to date' if same else 'differs from the generator: run deploy/grafana/generate.py'}")
        return 0 if same else 1
    tmp = OUT + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, OUT)
    print(f"wrote {OUT} ({len(PANELS)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
