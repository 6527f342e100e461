"""Throwaway RabbitMQ nodes: private, on free loopback ports, with their own data directories.

`covey demo` starts one when no broker answers, and the tests use one for
anything that stops or restarts a broker, so the machine's own broker is never
touched; `LocalCluster` joins three of them into a cluster, for replication.
They need the `rabbitmq-server` package (Debian: `apt-get install
rabbitmq-server`); a node runs as the current user, not as `rabbitmq`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.errors import BrokerUnavailable

# Debian's /usr/sbin wrappers switch to the `rabbitmq` user and its files; the
# scripts they wrap run as whoever calls them, which a private node needs.
_SCRIPT_DIRS = (Path("/usr/lib/rabbitmq/bin"), Path("/usr/lib/rabbitmq/sbin"))


def _script(name: str) -> str | None:
    for directory in _SCRIPT_DIRS:
        if (directory / name).exists():
            return str(directory / name)
    for candidate in sorted(Path("/usr/lib/rabbitmq/lib").glob(f"rabbitmq_server-*/sbin/{name}")):
        return str(candidate)
    return shutil.which(name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for a TLS listener: the CA, and the broker's certificate and key."""

    ca: Path
    cert: Path
    key: Path


class LocalBroker:
    """Start with `with LocalBroker() as broker: ... broker.url ...`; removed on exit."""

    def __init__(
        self,
        workdir: Path | None = None,
        tls: TlsFiles | None = None,
        *,
        nodename: str | None = None,
        home: Path | None = None,
        management: bool = False,
        partition_handling: str | None = None,
        net_ticktime: int | None = None,
    ) -> None:
        """`home` holds the Erlang cookie (default: `workdir`); nodes that are to be
        clustered share one, and with it the cookie. With `management`, the node serves
        RabbitMQ's management API at `management_url` (a few seconds more to start).
        `partition_handling` (`cluster_partition_handling`: "pause_minority", ...) and
        `net_ticktime` (seconds; Erlang's default is 60) are for a cluster's nodes; unset,
        RabbitMQ's defaults apply."""
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="covey-broker-"))
        self.home = home or self.workdir
        self.nodename = nodename or f"covey-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.tls = tls
        self.tls_port = free_port() if tls is not None else None
        self.management_port = free_port() if management else None
        self.partition_handling = partition_handling
        self.net_ticktime = net_ticktime
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return _script("rabbitmq-server") is not None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def tls_url(self) -> str:
        """The amqps:// URL (with `tls`); the certificate is for `localhost`."""
        return f"amqps://guest:guest@localhost:{self.tls_port}/"

    @property
    def management_url(self) -> str:
        """The management API's base URL (with `management`)."""
        if self.management_port is None:
            raise RuntimeError("this node was started without the management plugin")
        return f"http://127.0.0.1:{self.management_port}"

    def _config(self) -> str:
        lines = [f"listeners.tcp.1 = 127.0.0.1:{self.port}", "log.console = false"]
        if self.partition_handling is not None:
            lines.append(f"cluster_partition_handling = {self.partition_handling}")
        if self.management_port is not None:
            lines += [
                f"management.tcp.port = {self.management_port}",
                "management.tcp.ip = 127.0.0.1",
            ]
        if self.tls is not None:
            lines += [
                f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {self.tls.ca}",
                f"ssl_options.certfile = {self.tls.cert}",
                f"ssl_options.keyfile = {self.tls.key}",
                "ssl_options.verify = verify_none",
                "ssl_options.fail_if_no_peer_cert = false",
                # guest may log in only from loopback, which an amqps client on 127.0.0.1 is
            ]
        return "\n".join(lines) + "\n"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOME=str(self.home),  # its Erlang cookie: shared with `ctl`, and a cluster's nodes
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.workdir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.workdir / "log"),
            RABBITMQ_CONFIG_FILE=str(self.workdir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.workdir / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(self.workdir / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.workdir / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.workdir / "rabbitmq.pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def start(self, timeout: float = 90.0) -> LocalBroker:
        self.launch()
        self.wait_listening(timeout)
        return self

    def launch(self) -> None:
        """Start the node's process and return at once (`wait_listening` waits for it)."""
        server = _script("rabbitmq-server")
        if server is None:
            raise RuntimeError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "rabbitmq.conf").write_text(self._config())
        (self.workdir / "rabbitmq-env.conf").write_text("")
        advanced = self.workdir / "advanced.config"
        if self.net_ticktime is not None:
            # Not settable in rabbitmq.conf: it is the Erlang kernel's, not RabbitMQ's.
            advanced.write_text(f"[{{kernel, [{{net_ticktime, {self.net_ticktime}}}]}}].\n")
        else:
            advanced.unlink(missing_ok=True)
        plugins = "rabbitmq_management" if self.management_port is not None else ""
        (self.workdir / "enabled_plugins").write_text(f"[{plugins}].\n")
        log = (self.workdir / "server.log").open("ab")
        self._process = subprocess.Popen(
            [server],
            env=self._env(),
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so `stop` can end the whole Erlang process tree
        )

    def wait_listening(self, timeout: float = 90.0) -> None:
        """Wait until the launched node accepts AMQP connections."""
        assert self._process is not None, "launch the node first"
        deadline = time.monotonic() + timeout
        while not answers("127.0.0.1", self.port, timeout=0.5):
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"rabbitmq-server exited with {self._process.returncode}; "
                    f"see {self.workdir / 'server.log'}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"rabbitmq-server did not listen within {timeout:g} s")
            time.sleep(0.2)

    @property
    def running(self) -> bool:
        """Whether the node's process is alive (started and not stopped)."""
        return self._process is not None and self._process.poll() is None

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run `rabbitmqctl` against this node and return what it printed."""
        return self.tool("rabbitmqctl", *args, timeout=timeout)

    def tool(self, script: str, *args: str, timeout: float = 60.0) -> str:
        """Run one of RabbitMQ's command-line tools (`rabbitmq-queues`, ...) against this
        node, with its HOME and so its cookie, and return what it printed."""
        path = _script(script)
        if path is None:
            raise RuntimeError(f"{script} is not installed")
        result = subprocess.run(
            [path, "-n", self.nodename, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return result.stdout

    def wait_running(self, timeout: float = 90.0) -> None:
        """Wait until `rabbitmq-diagnostics check_running` says the RabbitMQ application
        runs (`await_startup` can hang on a node that is joining a cluster)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.tool("rabbitmq-diagnostics", "check_running", timeout=30)
                return
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.nodename} was not running within {timeout:g} s"
                    ) from None
                time.sleep(0.5)

    def rss_bytes(self) -> int:
        """The resident memory of the node's processes (beam and its helpers), in bytes."""
        if not self.running:
            return 0
        assert self._process is not None
        return _group_sum(self._process.pid, _RSS_FIELD) * os.sysconf("SC_PAGE_SIZE")

    def cpu_seconds(self) -> float:
        """The CPU time (user and system) the node's processes have used so far."""
        if not self.running:
            return 0.0
        assert self._process is not None
        ticks = _group_sum(self._process.pid, _UTIME_FIELD) + _group_sum(
            self._process.pid, _STIME_FIELD
        )
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the node (its data stays until `remove`), gracefully then by force."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # Erlang helpers (erl_child_setup, inet_gethost) may outlive beam briefly.
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    def remove(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


# Fields of /proc/PID/stat after the command name (which is in parentheses and may hold
# spaces), counted from 0 at `state`: state ppid pgrp ... utime stime ... rss.
_PGRP_FIELD = 2
_UTIME_FIELD = 11  # clock ticks
_STIME_FIELD = 12
_RSS_FIELD = 21  # pages


def _group_sum(group: int, field: int) -> int:
    """One /proc/PID/stat field summed over the processes in process group `group`."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone while we looked
        if int(fields[_PGRP_FIELD]) == group:
            total += int(fields[field])
    return total


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """Where a quorum queue's or a stream's replicas are: every member, the leader
    (a stream's writer), and the members that answer now."""

    members: tuple[str, ...]
    leader: str | None
    online: tuple[str, ...]


class LocalCluster:
    """Start with `with LocalCluster() as cluster: ... cluster.urls ...`: `size` private
    nodes (see LocalBroker) that share one Erlang cookie, clustered by joining the
    others to the first; all removed on exit.

    Nodes are numbered from 0, as in `nodes` and `urls`. A node stopped with
    `stop_node` keeps its data, and `start_node` brings it back into the cluster.
    Three nodes take about 400 MB, and here 20-30 s to start and join.
    """

    def __init__(
        self,
        size: int = 3,
        workdir: Path | None = None,
        *,
        management: bool = False,
        partition_handling: str | None = None,
        net_ticktime: int | None = None,
    ) -> None:
        """`partition_handling` and `net_ticktime`: as for LocalBroker, on every node."""
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="covey-cluster-"))
        stem = f"covey-{uuid.uuid4().hex[:6]}"
        self.nodes = [
            LocalBroker(
                self.workdir / f"node-{i}",
                nodename=f"{stem}-{i}@localhost",
                home=self.workdir,
                management=management,
                partition_handling=partition_handling,
                net_ticktime=net_ticktime,
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def index(self, nodename: str) -> int:
        """Which node (its number) has this Erlang node name."""
        for i, node in enumerate(self.nodes):
            if node.nodename == nodename:
                return i
        raise ValueError(f"{nodename} is not a node of this cluster")

    def start(self, timeout: float = 120.0) -> LocalCluster:
        self._share_cookie()
        try:
            for node in self.nodes:  # booting is mostly waiting: all at once
                node.launch()
            for node in self.nodes:
                node.wait_listening(timeout)
            # One join at a time: each changes the cluster's membership (Mnesia's schema).
            for node in self.nodes[1:]:
                self._join(node, timeout)
        except BaseException:
            self.remove()
            raise
        return self

    def _share_cookie(self) -> None:
        """Write the Erlang cookie every node (and rabbitmqctl) reads from the shared HOME."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        cookie = self.workdir / ".erlang.cookie"
        cookie.write_text("".join(secrets.choice(string.ascii_uppercase) for _ in range(20)))
        cookie.chmod(0o400)  # Erlang refuses a cookie file others may read

    def _join(self, node: LocalBroker, timeout: float) -> None:
        """Join `node` to the first node. Each step may be repeated: a CLI that could not
        reach a node that answers AMQP (exit 69, seen once in CI on a loaded machine; 75
        is a timeout) is tried again until `timeout`; stop_app and start_app are
        idempotent, and join_cluster says ok to a node that has joined already."""
        deadline = time.monotonic() + timeout
        for step in (("stop_app",), ("join_cluster", self.nodes[0].nodename), ("start_app",)):
            while True:
                try:
                    node.ctl(*step)
                    break
                except subprocess.CalledProcessError as error:
                    if error.returncode not in (69, 75) or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"rabbitmqctl {' '.join(step)} on {node.nodename} exited with "
                            f"{error.returncode}: {(error.stderr or '').strip()[-500:]}"
                        ) from error
                    time.sleep(1.0)

    def stop_node(self, index: int) -> None:
        """Stop one node (gracefully); the others carry on as a cluster without it."""
        self.nodes[index].stop()

    def start_node(self, index: int, timeout: float = 120.0) -> None:
        """Start a stopped node again: it rejoins the cluster with the data it had."""
        node = self.nodes[index]
        node.start(timeout)
        node.wait_running(timeout)

    def partition(self, index: int, *, silent: bool = False) -> float:
        """Cut node `index` off from the others, all running on: a network partition on
        loopback, without firewall rules. Erlang checks a per-peer cookie when two nodes
        connect, so node `index` is given a wrong cookie for each of its peers: no side
        can connect again, while `rabbitmqctl` (a node of its own, with the shared
        cookie) reaches every node. `heal` undoes it.

        The connections already made: by default node `index` drops them, so both sides
        notice at once. `silent` leaves them open and stops reading them (passive mode)
        on both sides, as a network that stops carrying packets: each node notices when
        its peer's ticks stop coming, within `net_ticktime`, at its own moment.

        Returns when node `index` cut itself off, by its clock (as `time.time()`;
        `rabbitmqctl` takes a second or more to start)."""
        peers = self._peers(index)
        if not silent:
            return self._eval_at(
                index,
                f"[begin erlang:set_cookie(N, covey_partitioned), erlang:disconnect_node(N) end"
                f" || N <- {peers}]",
            )
        # Only node `index` changes cookies: peers given the same wrong one would agree.
        cut = f"[erlang:set_cookie(N, covey_partitioned) || N <- {peers}], {_mute(peers)}"
        others = [i for i in range(len(self.nodes)) if i != index]
        with ThreadPoolExecutor(len(self.nodes)) as pool:  # one CLI start each: at once
            at = pool.submit(self._eval_at, index, cut)
            muted = [
                pool.submit(self._eval_at, i, _mute(f"['{self.nodes[index].nodename}']"))
                for i in others
            ]
            for done in muted:
                done.result()
            return at.result()

    def heal(self, index: int) -> float:
        """End `partition(index)`: node `index` takes the shared cookie for its peers
        again and connects to them (RabbitMQ then does the rest: a paused node resumes).
        After a `silent` cut, heal once both sides have noticed it (the muted connections
        are closed then). Returns when, as `partition` does."""
        return self._eval_at(
            index,
            f"C = erlang:get_cookie(), [begin erlang:set_cookie(N, C), net_adm:ping(N) end"
            f" || N <- {self._peers(index)}]",
        )

    def _eval_at(self, index: int, expression: str) -> float:
        """Evaluate an Erlang expression on node `index`; the node's time just after."""
        out = self.nodes[index].ctl("eval", f"{expression}, os:system_time(microsecond).")
        return int(out.strip()) / 1e6

    def _peers(self, index: int) -> str:
        """The other nodes' names as an Erlang list of atoms."""
        names = [f"'{n.nodename}'" for i, n in enumerate(self.nodes) if i != index]
        return "[" + ", ".join(names) + "]"

    def cluster_status(self, index: int, timeout: float = 30.0) -> dict[str, Any]:
        """What node `index` says of the cluster (`rabbitmqctl cluster_status`): its
        `running_nodes`, `partitions` and so on."""
        status = json.loads(
            self.nodes[index].ctl("cluster_status", "--formatter", "json", timeout=timeout)
        )
        if not isinstance(status, dict):
            raise RuntimeError(f"unexpected cluster_status: {str(status)[:200]}")
        return status

    def rss_bytes(self) -> int:
        """The resident memory of all the running nodes, in bytes."""
        return sum(node.rss_bytes() for node in self.nodes)

    def cpu_seconds(self) -> float:
        """The CPU time all the running nodes have used so far."""
        return sum(node.cpu_seconds() for node in self.nodes)

    def _any_running(self) -> LocalBroker:
        for node in self.nodes:
            if node.running:
                return node
        raise RuntimeError("no node of the cluster is running")

    def quorum_status(self, queue: str, vhost: str = "/") -> ReplicaStatus:
        """A quorum queue's members, leader and online members, from
        `rabbitmq-queues quorum_status` (what the Raft members say, unlike
        `list_queues`, which lags)."""
        rows = _json_rows(
            self._any_running().tool(
                "rabbitmq-queues", "quorum_status", "--formatter", "json", "-p", vhost, queue
            )
        )
        return _replica_status(
            rows, leader_role="leader", name_key="Node Name", role_key="Raft State"
        )

    def stream_status(self, stream: str, vhost: str = "/") -> ReplicaStatus:
        """A stream's members, writer (its leader) and online members, from
        `rabbitmq-streams stream_status`, which lists only the members that answer: one
        whose node is down is missing from `members` too."""
        rows = _json_rows(
            self._any_running().tool(
                "rabbitmq-streams", "stream_status", "--formatter", "json", "-p", vhost, stream
            )
        )
        return _replica_status(rows, leader_role="writer", name_key="node", role_key="role")

    def remove(self) -> None:
        # Stopping the nodes at once: one by one, each would wait for the others'
        # Raft members to hand over leadership.
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(LocalBroker.stop, self.nodes))
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def _mute(peers: str) -> str:
    """Erlang: stop reading the distribution connections to `peers` (a list of atoms)."""
    return (
        f"[inet:setopts(P, [{{active, false}}]) || {{N, P}} <- erlang:system_info(dist_ctrl),"
        f" lists:member(N, {peers})]"
    )


def _json_rows(output: str) -> list[dict[str, Any]]:
    rows = json.loads(output)
    if not isinstance(rows, list):
        raise RuntimeError(f"unexpected output from RabbitMQ's tools: {output[:200]}")
    return rows


def _replica_status(
    rows: Sequence[dict[str, Any]], *, leader_role: str, name_key: str, role_key: str
) -> ReplicaStatus:
    members = tuple(str(row[name_key]) for row in rows)
    leaders = [str(row[name_key]) for row in rows if row.get(role_key) == leader_role]
    # A member that answers has a role (leader, follower, candidate ...); one that does
    # not has a reason instead: "noproc", or ["nodedown", NODE] when its node is down.
    online = tuple(
        str(row[name_key])
        for row in rows
        if isinstance(row.get(role_key), str) and row[role_key] not in ("noproc", "timeout")
    )
    return ReplicaStatus(members, leaders[0] if leaders else None, online)


@contextmanager
def throwaway_broker() -> Iterator[str]:
    """Start a broker for the occasion and yield its AMQP URL; it is removed afterwards.

    A private rabbitmq-server node where the package is installed, else a
    RabbitMQ testcontainer where Docker works; else BrokerUnavailable.
    """
    if LocalBroker.available():
        with LocalBroker() as broker:
            yield broker.url
        return
    container = _docker_container()
    if container is not None:
        with container:
            host = container.get_container_host_ip()
            yield f"amqp://guest:guest@{host}:{container.get_exposed_port(5672)}/"
        return
    raise BrokerUnavailable(
        "no RabbitMQ answers and none can be started here: install one "
        "(apt-get install rabbitmq-server), or point COVEY_AMQP_URL at one"
    )


def _docker_container() -> Any:
    try:
        import docker
        from testcontainers.rabbitmq import RabbitMqContainer
    except ImportError:
        return None
    try:
        docker.from_env().ping()
    except Exception:  # no engine, no socket, no permission: all mean "no Docker here"
        return None
    return RabbitMqContainer("rabbitmq:3.13-management")
