"""Monitoring, checked by real clients: Prometheus scrapes `covey supervise`, promtool
checks the shipped config, rules and a scrape, and the dashboard's queries name metrics
that covey or RabbitMQ really export."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, World, start
from test_run import stamping_agent, wait_for

from coordinator.localbroker import answers, free_port

DEPLOY = REPO / "deploy"
PROMETHEUS_PLUGIN = "http://127.0.0.1:15692/metrics"


def promtool(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: apt-get install prometheus (.ci/run does)"
    return subprocess.run([tool, *args], input=input, capture_output=True, text=True, timeout=60)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_promtool_accepts_the_shipped_config_and_rules() -> None:
    checked = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = promtool("check", "rules", str(DEPLOY / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 7 rules found" in rules.stdout


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict]:  # type: ignore[type-arg]
        answer = json.loads(fetch(f"{self.url}/api/v1/query?query={urllib.parse.quote(expr)}"))
        assert answer["status"] == "success", answer
        return answer["data"]["result"]  # type: ignore[no-any-return]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def supervised(applied: World) -> Iterator[tuple[World, int]]:
    """`covey supervise` serving /metrics on a free port."""
    port = free_port()
    applied.extra_env["COVEY_SHUTDOWN_GRACE"] = "1"
    daemon = start(applied, "supervise", "--metrics-port", str(port))
    wait_for(lambda: answers("127.0.0.1", port), timeout=30)
    yield applied, port
    daemon.send_signal(signal.SIGTERM)
    daemon.communicate(timeout=60)


@pytest.fixture
def prometheus(tmp_path: Path, supervised: tuple[World, int]) -> Iterator[Prometheus]:
    """A real Prometheus on loopback, scraping the supervisor every second."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: apt-get install prometheus (.ci/run does)"
    _, covey_port = supervised
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: covey\n    static_configs: [{{targets: ['127.0.0.1:{covey_port}']}}]\n"
    )
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers("127.0.0.1", port), timeout=60)
        yield Prometheus(url)
    finally:
        process.terminate()
        process.wait(30)


def test_prometheus_sees_what_the_supervisor_did(
    supervised: tuple[World, int], prometheus: Prometheus
) -> None:
    world, port = supervised
    world.add_agent("good", 'command = "true"\nlock = "none"\n')
    world.add_agent("bad", 'command = "exit 3"\nlock = "none"\n')
    world.add_agent(
        "careful",
        'command = "true"\nlock = "none"\n[[preflight]]\nname = "api"\ncommand = ["false"]\n',
    )
    log = stamping_agent(world, "holder", 300.0)  # holds `global` while the test looks
    holding = start(world, "run", "holder")
    try:
        # The daemon loaded its roster before these agents existed: a SIGHUP picks them up.
        daemon_pid = subprocess.run(
            ["pgrep", "-f", f"supervise --metrics-port {port}"], capture_output=True, text=True
        ).stdout.split()[0]
        subprocess.run(["kill", "-HUP", daemon_pid], check=True)
        wait_for(lambda: log.exists())
        for name in ("good", "bad", "careful"):
            deadline = time.monotonic() + 30
            while world.covey("run", name, "--via-supervisor").returncode != 0:
                assert time.monotonic() < deadline
                time.sleep(0.3)
        world.ok("send", "loner", "one")
        world.ok("send", "loner", "two")

        def seen(expr: str, expected: float) -> bool:
            return prometheus.value(expr) == expected

        wait_for(lambda: seen('up{job="covey"}', 1), timeout=60)
        wait_for(lambda: seen('covey_runs_total{agent="good",outcome="ok"}', 1), timeout=60)
        wait_for(lambda: seen('covey_runs_total{agent="bad",outcome="failed"}', 1), timeout=60)
        wait_for(lambda: seen('covey_agent_consecutive_failures{agent="bad"}', 1), timeout=60)
        wait_for(
            lambda: seen('covey_preflight_failures_total{agent="careful",hook="api"}', 1),
            timeout=60,
        )
        wait_for(lambda: seen('covey_lock_holder{lock="global",agent="holder"}', 1), timeout=60)
        wait_for(lambda: seen('covey_mailbox_pending{participant="agent:loner"}', 2), timeout=60)
        assert prometheus.value('covey_runs_total{trigger="request"}') is not None
        assert prometheus.value("covey_roster_agents") == 7
    finally:
        holding.send_signal(signal.SIGTERM)
        holding.wait(30)


def test_changelog_lag_falls_to_zero_once_a_run_has_seen_the_news(applied: World) -> None:
    applied.add_agent("reader", 'command = "true"\nlock = "none"\n')
    for n in range(3):
        applied.ok("log", "add", f"change {n}")
    port = free_port()
    daemon = start(applied, "supervise", "--metrics-port", str(port))

    def lag(agent: str) -> float | None:
        scrape = fetch(f"http://127.0.0.1:{port}/metrics")
        found = re.search(rf'^covey_changelog_lag_entries{{agent="{agent}"}} (\S+)$', scrape, re.M)
        return float(found.group(1)) if found else None

    try:
        wait_for(lambda: answers("127.0.0.1", port), timeout=30)
        wait_for(lambda: lag("reader") == 3, timeout=30)  # never run: all three are news
        deadline = time.monotonic() + 30
        while applied.covey("run", "reader", "--via-supervisor").returncode != 0:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        # Its run ended well, so its cursor moved; the supervisor reads it again at once
        # (not at the next full sweep of cursors, a minute away).
        wait_for(lambda: lag("reader") == 0, timeout=30)
        assert lag("writer") == 3
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=60)


def test_the_under_replication_alert_fires_when_a_member_is_offline(tmp_path: Path) -> None:
    """promtool's rule unit test: one of three members offline for 2 min fires the alert;
    all three online never does."""
    (tmp_path / "replicas.test.yml").write_text(
        f"rule_files: [{DEPLOY / 'alerts.yml'}]\n"
        "evaluation_interval: 30s\n"
        "tests:\n"
        "  - interval: 30s\n"
        "    input_series:\n"
        '      - series: \'covey_queue_members{queue="agent.scout",type="quorum"}\'\n'
        "        values: '3x10'\n"
        '      - series: \'covey_queue_online_members{queue="agent.scout",type="quorum"}\'\n'
        "        values: '3 3 2 2 2 2 2 2 2 2 2'\n"
        '      - series: \'covey_queue_members{queue="covey.dead",type="quorum"}\'\n'
        "        values: '3x10'\n"
        '      - series: \'covey_queue_online_members{queue="covey.dead",type="quorum"}\'\n'
        "        values: '3x10'\n"
        "    alert_rule_test:\n"
        "      - eval_time: 1m\n"
        "        alertname: CoveyQueueUnderReplicated\n"
        "        exp_alerts: []\n"
        "      - eval_time: 4m\n"
        "        alertname: CoveyQueueUnderReplicated\n"
        "        exp_alerts:\n"
        "          - exp_labels: {severity: critical, queue: agent.scout, type: quorum}\n"
        "            exp_annotations:\n"
        "              summary: agent.scout has only 2 of its replicas online\n"
        "              description: A RabbitMQ node is down or cut off; `covey status` names it.\n"
    )
    tested = promtool("test", "rules", str(tmp_path / "replicas.test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_each_replicated_queue_shows_its_leader_and_members(supervised: tuple[World, int]) -> None:
    """On one node: every quorum queue and stream has one member, online, and leads
    itself; `covey status --json` says the same (the management API answers guest)."""
    world, port = supervised

    def scrape() -> str:
        return fetch(f"http://127.0.0.1:{port}/metrics")

    wait_for(lambda: 'covey_queue_members{queue="agent.loner",type="quorum"} 1.0' in scrape())
    text = scrape()
    assert 'covey_queue_online_members{queue="agent.loner",type="quorum"} 1.0' in text
    assert 'covey_queue_members{queue="covey.dead",type="quorum"} 1.0' in text
    # A stream is listed where RabbitMQ's listing names its members (3.10 does at times).
    assert not re.search(r'covey_queue_members\{queue="covey\.[a-z]+",type="stream"\} [^1]', text)
    assert re.search(r'covey_queue_leader\{node="rabbit@[^"]+",queue="agent.loner"\} 1.0', text)
    status = json.loads(world.ok("status", "--json"))
    loner = next(q for q in status["replicas"] if q["queue"] == "agent.loner")
    assert loner["type"] == "quorum" and len(loner["members"]) == 1
    assert loner["online"] == loner["members"] and loner["leader"] == loner["members"][0]
    # One node, all online: the table has nothing to add about replicas.
    assert "replicas:" not in world.ok("status")


def test_promtool_finds_nothing_wrong_in_a_scrape(supervised: tuple[World, int]) -> None:
    _, port = supervised
    scrape = fetch(f"http://127.0.0.1:{port}/metrics")
    checked = promtool("check", "metrics", input=scrape)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def exported_names(scrape: str) -> set[str]:
    names = set()
    for line in scrape.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
            if kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_dashboard_query_names_a_metric_that_is_exported(
    supervised: tuple[World, int],
) -> None:
    _, port = supervised
    exported = exported_names(fetch(f"http://127.0.0.1:{port}/metrics"))
    exported |= exported_names(fetch(PROMETHEUS_PLUGIN))  # rabbitmq_prometheus (.ci/run)
    dashboard = json.loads((DEPLOY / "grafana" / "covey.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(queries) >= 10
    used = {name for q in queries for name in re.findall(r"\b(?:covey|rabbitmq)_[a-z_]+", q)}
    assert used, queries
    assert used - exported == set()
    alerts = (DEPLOY / "alerts.yml").read_text()
    in_alerts = set(re.findall(r"\bcovey_[a-z_]+", alerts))
    assert in_alerts - exported == set()
