"""The metrics endpoint under load: step time of a training loop while /metrics serves 10,000 requests,
against the same loop unloaded, in one `ckptd run` (windows alternate: quiet, loaded, quiet, loaded).

    python benchmarks/bench_metrics_load.py [--requests 10000] [--clients 2] [--client-nice 19]

Prints the median step time of each window and the ratio loaded/quiet (target: <= 1.05), and, as a
reference, the same for a window in which a plain busy loop (no ckptd involved) occupies the other core.
The load generator runs on the same host; its threads run at nice --client-nice (default 19) to stand
in for a scraper on another machine (0: it competes with the trainer for this host's cores as well).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def status(root: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "ckptd", "status", "--dir", root, "--json"],
                       capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def steps_between(path: str, t0: float, t1: float) -> list[float]:
    out = []
    with open(path) as f:
        for line in f:
            t, d = line.split()
            if t0 <= float(t) <= t1:
                out.append(float(d))
    return out


def hammer(host: str, port: int, n: int, clients: int, nice: int) -> float:
    done = [0]

    def client(k: int) -> None:
        if nice:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        conn = http.client.HTTPConnection(host, port, timeout=10)
        for _ in range(k):
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"/metrics answered {r.status}")
            done[0] += 1
        conn.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(n // clients,)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0


def spin(seconds: float, nice: int) -> None:
    """The reference window: one process that only burns CPU (at the load generator's nice), so the
    figure shows what any work on this host's other core costs the trainer, ckptd or not."""
    code = f"import os, time\nos.nice({nice})\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--quiet-seconds", type=float, default=10.0)
    ap.add_argument("--client-nice", type=int, default=19, help="nice of the load generator's threads")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ckptd-metrics-load-")
    root, steps = os.path.join(work, "ck"), os.path.join(work, "steps.txt")
    run = subprocess.Popen([sys.executable, "-m", "ckptd", "run", "--dir", root, "--metrics-addr", "127.0.0.1:0",
                            os.path.join(HERE, "_load_trainer.py")], env={**os.environ, "LOAD_STEPS_FILE": steps},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        url = None
        while time.monotonic() < deadline and not url:
            st = status(root)
            url = (st.get("metrics") or {}).get("url") if st.get("trainers") else None
            time.sleep(0.2)
        if not url:
            raise SystemExit("the run did not come up with a metrics endpoint")
        hostport = url.split("//")[1].split("/")[0]
        host, port = hostport.rsplit(":", 1)
        time.sleep(3)  # warm-up steps
        rows = []
        windows = ("quiet", "loaded", "spin", "quiet", "loaded", "spin")
        for window in windows:
            t0 = time.time()
            served = 0.0
            if window == "quiet":
                time.sleep(args.quiet_seconds)
            elif window == "spin":
                spin(args.quiet_seconds, args.client_nice)
            else:
                served = hammer(host, int(port), args.requests, args.clients, args.client_nice)
            t1 = time.time()
            d = steps_between(steps, t0, t1)
            rows.append((window, len(d), statistics.median(d), t1 - t0, served))
        for w, n, med, _wall, served in rows:
            extra = f", {args.requests} requests in {served:.1f} s ({args.requests / served:.0f}/s)" if served else ""
            print(f"{w:7s} {n:6d} steps, median step {med * 1e3:.3f} ms{extra}")
        quiet = statistics.median([r[2] for r in rows if r[0] == "quiet"])
        loaded = statistics.median([r[2] for r in rows if r[0] == "loaded"])
        spun = statistics.median([r[2] for r in rows if r[0] == "spin"])
        ratio = loaded / quiet
        print(f"reference: a busy loop on the other core (no ckptd involved), spin/quiet: {spun / quiet:.3f}; "
              f"loaded/spin: {loaded / spun:.3f}")
        print(f"load generator: {args.clients} clients at nice {args.client_nice}; load average {os.getloadavg()}")
        print(f"loaded/quiet median step ratio: {ratio:.3f} ({'PASS' if ratio <= 1.05 else 'MISS'} <= 1.05)")
        return 0
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(60)


if __name__ == "__main__":
    sys.exit(main())
