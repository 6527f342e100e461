"""deploy/compose.yaml, checked without a Docker engine: the compose tool itself
validates and resolves it (`docker compose config`, or Debian's `docker-compose
config`, neither of which needs an engine), and each test reads what it resolved:
the files it mounts, the Prometheus config promtool checks, the peer-discovery
list and the URLs covey gets. Two tests run covey against the machine's broker: its exclusive
queues name their type, so a quorum default cannot touch them; and locks, tokens,
cursors and mail work in a vhost whose default queue type is quorum."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from conftest import REPO, Broker, ManagementAdmin, World, start
from test_monitoring import promtool
from test_run import wait_for
from yarl import URL

from coordinator.guard import GRACE_SECONDS
from coordinator.lock import TAKEOVER_SECONDS

DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
NODES = ("rabbit1", "rabbit2", "rabbit3")
SECRETS = {
    "COVEY_ERLANG_COOKIE": "test-cookie",
    "COVEY_RABBITMQ_PASSWORD": "test0password",
    "COVEY_GRAFANA_PASSWORD": "test-grafana",
}


def compose_command() -> list[str]:
    """The compose v2 plugin where Docker has it, else Debian's docker-compose (v1.29,
    which tests/run installs): both validate the file against the compose schema."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    assert legacy, "no compose tool: apt-get install docker-compose (tests/run does)"
    return [legacy]


def compose_config(
    secrets: dict[str, str] = SECRETS, *extra: str
) -> subprocess.CompletedProcess[str]:
    # Only the secrets given: a COVEY_* variable of the caller's must not fill a gap.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVEY_")} | secrets
    return subprocess.run(
        [*compose_command(), "-f", str(COMPOSE_FILE), "config", *extra],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The compose file as the compose tool resolved it: variables filled in,
    anchors merged, relative paths made absolute."""
    result = compose_config()
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume, from v1's short form or v2's long form."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        found.append((source, target))
    return found


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path, for the files and folders mounted from the host."""
    return {target: Path(source) for source, target in mounts(service) if source.startswith("/")}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # KEY=VALUE items
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def test_the_compose_tool_accepts_the_file() -> None:
    quiet = compose_config({**SECRETS}, "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == ""


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_each_secret_must_be_given(secret: str) -> None:
    missing = compose_config({k: v for k, v in SECRETS.items() if k != secret}, "-q")
    assert missing.returncode != 0
    assert secret in missing.stderr


def test_it_runs_what_the_issue_asks_for_with_pinned_images(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) == {*NODES, "covey", "prometheus", "grafana"}
    for name, service in services.items():
        if "image" in service:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
    for node in NODES:
        image = services[node]["image"]
        assert re.fullmatch(r"rabbitmq:3\.13\.\d+-management", image), image
        assert services[node]["hostname"] == node  # the node is rabbit@HOSTNAME
        assert "check_running" in services[node]["healthcheck"]["test"]
    build = services["covey"]["build"]
    assert Path(build["context"]) == REPO
    assert (REPO / build["dockerfile"]) == DEPLOY / "Dockerfile"
    assert services["covey"]["command"][0] == "supervise"


def test_every_file_it_mounts_exists_in_deploy(resolved: dict[str, Any]) -> None:
    checked = 0
    for name, service in resolved["services"].items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name} mounts {source} at {target}: it does not exist"
            assert source.is_relative_to(DEPLOY), f"{name} mounts {source}, outside deploy/"
            checked += 1
    assert (
        checked == 15
    )  # three on each node, the covey home, two for Prometheus, three for Grafana


def test_the_nodes_notice_a_silent_peer_within_the_lock_takeover_bound(
    resolved: dict[str, Any],
) -> None:
    """Each node gets advanced.config, which Erlang reads (checked with Erlang's own
    parser), with a net_ticktime short enough that the two sides of a partition notice
    it less than the 8 s takeover wait apart (half of it at most: see cluster.md)."""
    services = resolved["services"]
    for node in NODES:
        config = bind_mounts(services[node])["/etc/rabbitmq/advanced.config"]
        read = subprocess.run(
            [
                "erl",
                "-noshell",
                "-eval",
                f'{{ok, [[{{kernel, K}}]]}} = file:consult("{config}"), '
                'io:format("~p", [proplists:get_value(net_ticktime, K)]), halt().',
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert read.returncode == 0, read.stderr + read.stdout
        assert int(read.stdout) * 0.5 < TAKEOVER_SECONDS - GRACE_SECONDS, read.stdout


def test_the_nodes_share_one_cookie_and_list_each_other(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    cookies = {environment(services[node])["RABBITMQ_ERLANG_COOKIE"] for node in NODES}
    assert cookies == {SECRETS["COVEY_ERLANG_COOKIE"]}
    for node in NODES:
        config = bind_mounts(services[node])["/etc/rabbitmq/conf.d/90-covey.conf"]
        settings = dict(
            (key.strip(), value.strip())
            for key, _, value in (
                line.split("#")[0].partition("=") for line in config.read_text().splitlines()
            )
            if key.strip()
        )
        assert settings["cluster_formation.peer_discovery_backend"] == "classic_config"
        listed = {
            v
            for k, v in settings.items()
            if k.startswith("cluster_formation.classic_config.nodes.")
        }
        assert listed == {f"rabbit@{services[n]['hostname']}" for n in NODES}
        assert settings["default_queue_type"] == "quorum"
        assert settings["cluster_partition_handling"] == "pause_minority"
        plugins = bind_mounts(services[node])["/etc/rabbitmq/enabled_plugins"].read_text()
        assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins


def test_covey_gets_the_three_nodes(resolved: dict[str, Any]) -> None:
    env = environment(resolved["services"]["covey"])
    urls = [URL(url) for url in env["COVEY_AMQP_URLS"].split(",")]
    assert [url.host for url in urls] == list(NODES)
    for url in urls:
        assert url.scheme == "amqp" and url.port == 5672
        assert (url.user, url.password) == ("covey", SECRETS["COVEY_RABBITMQ_PASSWORD"])
    assert environment(resolved["services"][NODES[0]])["RABBITMQ_DEFAULT_USER"] == "covey"
    home = bind_mounts(resolved["services"]["covey"])[env["COVEY_HOME"]]
    assert (home / "covey.toml").is_file() and (home / "agents").is_dir()


def test_the_prometheus_config_it_mounts_passes_promtool(resolved: dict[str, Any]) -> None:
    prometheus = resolved["services"]["prometheus"]
    flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    in_container = flag.split("=", 1)[1]
    files = bind_mounts(prometheus)
    config_file = files[in_container]
    checked = promtool("check", "config", str(config_file))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load(config_file.read_text())
    # The rule files sit beside the config in the container as they do in deploy/.
    for rules in config["rule_files"]:
        mounted = files[str(Path(in_container).parent / rules)]
        assert mounted == config_file.parent / rules == DEPLOY / "alerts.yml"
    targets = {
        job["job_name"]: {t for group in job["static_configs"] for t in group["targets"]}
        for job in config["scrape_configs"]
    }
    assert targets["covey"] == {"covey:9464"}
    assert targets["rabbitmq"] == {f"{node}:15692" for node in NODES}


def test_grafana_gets_the_data_source_and_the_dashboard(resolved: dict[str, Any]) -> None:
    files = bind_mounts(resolved["services"]["grafana"])
    datasource = yaml.safe_load(
        files["/etc/grafana/provisioning/datasources/prometheus.yml"].read_text()
    )
    assert [d["url"] for d in datasource["datasources"]] == ["http://prometheus:9090"]
    provider = yaml.safe_load(files["/etc/grafana/provisioning/dashboards/covey.yml"].read_text())
    folder = provider["providers"][0]["options"]["path"]
    assert files[f"{folder}/covey.json"] == DEPLOY / "grafana" / "covey.json"


def test_covey_names_the_type_of_its_exclusive_queues(broker: Broker, applied: World) -> None:
    """A node whose default queue type is quorum (deploy/rabbitmq.conf) would make a
    typeless exclusive queue a quorum queue, which cannot be exclusive: covey's lock
    slots and listeners say they are classic. Seen on the broker while a run holds
    the global lock and a supervisor listens."""
    if not isinstance(broker.admin, ManagementAdmin):
        pytest.skip("needs RabbitMQ's management API to read queue arguments")
    applied.add_agent("holder", 'command = "sleep 60"\n')
    applied.extra_env["COVEY_SHUTDOWN_GRACE"] = "1"
    vhost = URL(applied.amqp_url).path.lstrip("/")
    holding = start(applied, "run", "holder")
    supervising = start(applied, "supervise", "--no-metrics")

    def exclusive_queues() -> list[dict[str, Any]]:
        queues = broker.admin.api.call("GET", f"queues/{quote(vhost, safe='')}") or []  # type: ignore[attr-defined]
        return [queue for queue in queues if queue.get("exclusive")]

    def lock_and_listener_seen() -> bool:
        names = [queue["name"] for queue in exclusive_queues()]
        return "covey.lock.global" in names and any(n.startswith("amq.gen-") for n in names)

    try:
        wait_for(lock_and_listener_seen, timeout=60)
        queues = exclusive_queues()
        for queue in queues:
            assert queue["arguments"].get("x-queue-type") == "classic", queue
    finally:
        for process in (holding, supervising):
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=60)


@pytest.fixture
def quorum_default_world(broker: Broker, tmp_path: Path) -> Iterator[World]:
    """A covey home on a vhost of its own whose default queue type is quorum: what
    default_queue_type = quorum in deploy/rabbitmq.conf does to every vhost (a vhost's
    own default exists from RabbitMQ 3.10, the node-wide one from 3.13.3)."""
    if not isinstance(broker.admin, ManagementAdmin):
        pytest.skip("needs RabbitMQ's management API to set a vhost's default queue type")
    api = broker.admin.api
    name = f"covey-test-quorum-{uuid.uuid4().hex[:10]}"
    user = URL(broker.url).user or "guest"
    where = quote(name, safe="")
    # 3.10 reads `defaultqueuetype`; 3.11 renamed it and reads both.
    api.call(
        "PUT", f"vhosts/{where}", {"defaultqueuetype": "quorum", "default_queue_type": "quorum"}
    )
    try:
        api.call(
            "PUT",
            f"permissions/{where}/{quote(user, safe='')}",
            dict.fromkeys(("configure", "write", "read"), ".*"),
        )
        described = api.call("GET", f"vhosts/{where}")
        if "quorum" not in (
            described.get("default_queue_type"),
            described.get("metadata", {}).get("default_queue_type"),
        ):
            pytest.skip(f"this RabbitMQ keeps no default queue type for a vhost: {described}")
        home = tmp_path / "home"
        home.mkdir()
        (home / "covey.toml").write_text('identity = "human:ada"\n\n[humans.ada]\n')
        yield World(home=home, amqp_url=broker.vhost_url(name), state_dir=tmp_path / "state")
    finally:
        broker.admin.delete_vhost(name)


def test_covey_works_where_the_default_queue_type_is_quorum(
    broker: Broker, quorum_default_world: World
) -> None:
    """Locks, fencing tokens, cursors and mail on a vhost whose default queue type is
    quorum: the mail's queues and the notes (lock holders and fences, cursors) are quorum
    queues as ever, and the exclusive lock queues stay classic (see EXCLUSIVE_ARGUMENTS)."""
    world = quorum_default_world
    world.add_agent(
        "worker", 'command = "cat \\"$COVEY_DIGEST_FILE\\" > digest-$COVEY_FENCING_TOKEN.txt"\n'
    )
    world.ok("topology", "apply")
    world.ok("log", "add", "first-news")
    world.ok("run", "worker")
    world.ok("run", "worker")
    folder = world.home / "agents" / "worker"
    # The fence note gave each run a token one higher; the cursor note moved past the news.
    assert "first-news" in (folder / "digest-1.txt").read_text()
    assert "first-news" not in (folder / "digest-2.txt").read_text()
    world.ok("send", "worker", "hello-on-quorum")
    assert "hello-on-quorum" in world.ok("inbox", "--as", "worker")

    types = broker.admin.queue_types(URL(world.amqp_url).path.lstrip("/"))
    for name in ("covey.lock.global.holder", "covey.lock.global.fence", "covey.cursor.worker"):
        assert types[name] == "quorum", (name, types)
    assert types["agent.worker"] == "quorum"
