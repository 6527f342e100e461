"""Render the dashboard's main panels to a PNG from real data, where Grafana cannot run.

It runs a small roster under `covey supervise` for a few minutes in a vhost of its
own (agents on second-level schedules: one healthy, one that fails now and then,
one whose preflight check fails, all sharing the global lock, plus mail to a
person), lets a real Prometheus scrape it every second, then draws the panels
from Prometheus's range queries with the dashboard's own expressions.

    .venv/bin/pip install matplotlib
    .venv/bin/python deploy/grafana/preview.py [--seconds 180] [--out deploy/grafana/preview.png]

Needs RabbitMQ on localhost:5672 with the management plugin, and `prometheus` on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tests"))
from conftest import ManagementAdmin  # noqa: E402

from coordinator.localbroker import answers, free_port  # noqa: E402

ROSTER = {
    "scout": 'schedule = "* * * * * */10"\ncommand = "sleep 3"\n',
    "writer": (  # fails in every other 15-second window
        'schedule = "* * * * * */15"\ncommand = "sleep 4; test $(( $(date +%s) / 15 % 2 )) -eq 0"\n'
    ),
    "auditor": (  # needs no lock; its preflight check fails in every other 20-second window
        'schedule = "* * * * * */20"\ncommand = "sleep 1"\nlock = "none"\n'
        '[[preflight]]\nname = "api"\n'
        'command = ["sh", "-c", "test $(( $(date +%s) / 20 % 2 )) -eq 0"]\n'
    ),
}

# (title, PromQL, legend, style): "lines" for values, "timeline" for 0/1 holders.
PANELS = [
    ("Runs so far, by outcome", "sum by (outcome) (covey_runs_total)", "{outcome}", "lines"),
    (
        "Who holds the global lock",
        'max by (agent) (covey_lock_holder{lock="global"})',
        "{agent}",
        "timeline",
    ),
    (
        "Mean run duration over 1 min (s)",
        "sum by (agent) (rate(covey_run_duration_seconds_sum[1m]))"
        " / sum by (agent) (rate(covey_run_duration_seconds_count[1m]))",
        "{agent}",
        "lines",
    ),
    ("Mail waiting to be fetched", "covey_mailbox_pending", "{participant}", "lines"),
]
STEP = 1.0


def covey(env: dict[str, str], *args: str) -> None:
    subprocess.run(
        [str(Path(sys.executable).parent / "covey"), *args],
        env=env,
        check=True,
        capture_output=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=180)
    parser.add_argument("--out", type=Path, default=HERE / "preview.png")
    args = parser.parse_args()
    admin = ManagementAdmin("http://127.0.0.1:15672", "guest", "guest")
    vhost = f"covey-preview-{uuid.uuid4().hex[:6]}"
    admin.add_vhost(vhost, "guest")
    work = Path(tempfile.mkdtemp(prefix="covey-preview-"))
    try:
        home = work / "home"
        for name, toml in ROSTER.items():
            (home / "agents" / name).mkdir(parents=True)
            (home / "agents" / name / "agent.toml").write_text(toml)
        (home / "covey.toml").write_text('identity = "human:ada"\n[humans.ada]\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("COVEY_")}
        env.update(
            COVEY_HOME=str(home),
            COVEY_AMQP_URL=f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
            COVEY_STATE_DIR=str(work / "state"),
        )
        metrics_port, prom_port = free_port(), free_port()
        daemon = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "covey"),
                "supervise",
                "--metrics-port",
                str(metrics_port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        config = work / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: covey\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
        )
        prometheus = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while not answers("127.0.0.1", prom_port):
                time.sleep(0.2)
            started = time.time()
            while time.time() - started < args.seconds:
                if int(time.time() - started) % 20 < 2:
                    covey(env, "send", "human:ada", "status report", "--as", "scout")
                time.sleep(2)
            render(f"http://127.0.0.1:{prom_port}", started, time.time(), args.out)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
            prometheus.terminate()
            prometheus.wait(30)
    finally:
        admin.delete_vhost(vhost)
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")


def render(prometheus: str, start: float, end: float, out: Path) -> None:
    figure, axes = plt.subplots(2, 2, figsize=(13, 7), dpi=100)
    figure.suptitle("covey dashboard panels, from a real run (Prometheus range queries)")
    for axis, (title, expr, legend, style) in zip(axes.flat, PANELS, strict=True):
        query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": STEP})
        with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{query}") as response:
            series = json.load(response)["data"]["result"]
        for row, one in enumerate(sorted(series, key=lambda s: str(s["metric"]))):
            label = legend.format(**one["metric"])
            points = [(float(t) - start, float(v)) for t, v in one["values"] if v != "NaN"]
            if style == "timeline":  # a bar for each stretch the holder held the lock
                spans = [(t, STEP) for t, v in points if v >= 1]
                axis.broken_barh(spans, (row - 0.35, 0.7), label=label, color=f"C{row}")
            elif points:
                xs, ys = zip(*_with_gaps(points), strict=True)
                axis.plot(xs, ys, label=label, drawstyle="steps-post")
        if style == "timeline":
            axis.set_yticks(range(len(series)))
            axis.set_yticklabels(
                [
                    legend.format(**s["metric"])
                    for s in sorted(series, key=lambda s: str(s["metric"]))
                ],
                fontsize=8,
            )
        else:
            axis.legend(fontsize=7, loc="upper left")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("seconds into the run", fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out)


def _with_gaps(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Break the line where the series was absent, instead of bridging the gap."""
    out: list[tuple[float, float]] = []
    for t, v in points:
        if out and t - out[-1][0] > 2 * STEP:
            out.append((out[-1][0] + STEP, float("nan")))
        out.append((t, v))
    return out


if __name__ == "__main__":
    main()
