"""Draw docs/metrics-panels.png: the Grafana dashboard's panels during a real run with a crash, a restart and a
preemption. No Grafana server can run here, so the same PromQL (deploy/grafana/generate.py's PANELS, variables
substituted) is evaluated by a real Prometheus scraping a real `ckptd run`, and matplotlib draws the results.

    pip install matplotlib      # not a dependency of ckptd
    python benchmarks/metrics_picture.py [--out docs/metrics-panels.png]

The run: tests/fixtures/metrics_scenario.py (the fixture trainer at ~50 steps/s, a checkpoint every 200 steps,
SIGKILL 100 steps past a checkpoint, an AWS spot notice 20 s ahead). About a minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "deploy", "grafana")]

import generate  # noqa: E402
from fixtures.metrics_scenario import LINGER, Scenario  # noqa: E402

RATE_INTERVAL = "10s"
STATES = ("starting", "running", "stopping", "backoff", "finished", "stopped", "gave_up")  # metrics.STATES


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "metrics-panels.png"))
    ap.add_argument("--phase", type=float, default=15.0, help="seconds of training between events")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory(prefix="ckptd-picture-") as tmp:
        sc = Scenario(tmp, step_time=0.02, every_steps=200)
        events: list[tuple[float, str]] = []
        try:
            sc.wait(f"ckptd_child_up{sc.sel}", lambda v: v == 1, timeout=30)
            time.sleep(args.phase)
            sc.crash(lost=100)
            events.append((time.time(), "crash (SIGKILL)"))
            sc.wait(f"ckptd_child_up{sc.sel}", lambda v: v == 1, timeout=30)
            time.sleep(args.phase)
            sc.preempt(lead=20)
            events.append((time.time(), "AWS spot notice"))
            sc.run.wait(30)
            time.sleep(2)
            end = time.time()
            fig, axes = plt.subplots(5, 3, figsize=(18, 20))
            for ax, panel in zip(axes.flat, generate.PANELS, strict=False):
                for expr, legend in panel.queries:
                    q = (expr.replace("$__rate_interval", RATE_INTERVAL).replace('job=~"$job"', 'job="ckptd"')
                         .replace('instance=~"$instance"', f'instance="{sc.instance}"'))
                    for series in sc.prom.query_range(q, sc.t0, end, 0.5):
                        xs = [float(t) - sc.t0 for t, _ in series["values"]]
                        ys = [float(v) for _, v in series["values"]]
                        if panel.kind == "stat":  # a state: drawn as a timeline, one level per state
                            ys = [STATES.index(series["metric"]["state"])] * len(xs)
                        label = legend.replace("{{instance}}", "").strip()
                        for k, v in series["metric"].items():
                            label = label.replace(f"{{{{{k}}}}}", v)
                        ax.plot(xs, ys, ".-" if len(xs) < 20 else "-", label=label or panel.title, markersize=3)
                for t, _what in events:
                    ax.axvline(t - sc.t0, color="grey", linestyle=":", linewidth=1)
                if panel.kind == "stat":
                    ax.set_yticks(range(len(STATES)), STATES)
                else:
                    ax.ticklabel_format(axis="y", useOffset=False)
                ax.set_title(panel.title + (f" ({panel.unit})" if panel.unit not in ("none", "") else ""))
                ax.set_xlabel("seconds since start")
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7, loc="best")
            for ax in axes.flat[len(generate.PANELS):]:
                ax.axis("off")
            axes.flat[-1].text(0, 0.5, "dotted lines:\n" + "\n".join(f"{t - sc.t0:.0f} s  {w}" for t, w in events)
                               + f"\nthe run ends with exit 85, served {LINGER:g} s more (--metrics-linger)",
                               fontsize=11, va="center")
            fig.suptitle("ckptd dashboard panels, real run: checkpoints, a crash and restart, a preemption "
                         f"(PromQL of deploy/grafana/ckptd.json, $__rate_interval={RATE_INTERVAL})", fontsize=13)
            fig.tight_layout(rect=(0, 0, 1, 0.98))
            fig.savefig(args.out, dpi=60)
        finally:
            sc.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
