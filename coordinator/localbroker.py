"""A throwaway RabbitMQ node: private, on free loopback ports, with its own data directory.

`covey demo` starts one when no broker answers, and the tests use one for
anything that stops or restarts a broker, so the machine's own broker is never
touched. It needs the `rabbitmq-server` package (Debian: `apt-get install
rabbitmq-server`); the node runs as the current user, not as `rabbitmq`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
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

    def __init__(self, workdir: Path | None = None, tls: TlsFiles | None = None) -> None:
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="covey-broker-"))
        self.nodename = f"covey-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.tls = tls
        self.tls_port = free_port() if tls is not None else None
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

    def _config(self) -> str:
        lines = [f"listeners.tcp.1 = 127.0.0.1:{self.port}", "log.console = false"]
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
            HOME=str(self.workdir),  # its own Erlang cookie, shared with `ctl`
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
        server = _script("rabbitmq-server")
        if server is None:
            raise RuntimeError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "rabbitmq.conf").write_text(self._config())
        (self.workdir / "rabbitmq-env.conf").write_text("")
        (self.workdir / "enabled_plugins").write_text("[].\n")
        log = (self.workdir / "server.log").open("ab")
        self._process = subprocess.Popen(
            [server],
            env=self._env(),
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so `stop` can end the whole Erlang process tree
        )
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
        return self

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run `rabbitmqctl` against this node and return what it printed."""
        ctl = _script("rabbitmqctl")
        if ctl is None:
            raise RuntimeError("rabbitmqctl is not installed")
        result = subprocess.run(
            [ctl, "-n", self.nodename, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return result.stdout

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
