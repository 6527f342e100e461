"""Several broker addresses (`amqp_urls`): the first node that answers wins, a dead node is
no error, a client whose node goes away lands on another, and provisioned logins and TLS
work with a list. On the machine's broker plus loopback ports where no broker is: a port
nothing listens on (refuses at once), and a socket that takes connections and never
answers (as a node whose host has gone quiet would)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import World
from test_security import as_user, credentials, secured, self_signed, user_named
from yarl import URL

from coordinator.client import Covey
from coordinator.gateway import ordered
from coordinator.localbroker import LocalBroker, free_port
from coordinator.settings import Settings

__all__ = ["secured"]  # the fixture (test_security.py), used here by name


def dead(url: str) -> str:
    """`url` at a loopback port where nothing listens."""
    return str(URL(url).with_port(free_port()))


@pytest.fixture
def silent() -> Iterator[int]:
    """A loopback port that accepts TCP connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes handshakes; nobody reads
        yield listener.getsockname()[1]


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {stderr!r}"
    return lines[0]


def listed(world: World, *urls: str) -> None:
    """Point `world` at these URLs, tried as listed."""
    world.extra_env["COVEY_AMQP_URLS"] = ",".join(urls)
    world.extra_env["COVEY_AMQP_ORDER"] = "listed"


def subjects(world: World, who: str = "scout") -> list[str]:
    return [m["subject"] for m in world.json("inbox", "--as", who)]


# -- connecting -----------------------------------------------------------------------


def test_three_urls_the_first_dead_covey_send_uses_the_second_silently(applied: World) -> None:
    world = applied
    live = world.amqp_url  # COVEY_AMQP_URL stays set too: it is one of the list
    listed(world, dead(live), live, dead(live))
    result = world.covey("send", "scout", "through the second")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert subjects(world) == ["through the second"]


async def test_three_urls_the_first_dead_the_python_api_uses_the_second_silently(
    applied: World, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    world = applied
    live = world.amqp_url
    urls = [dead(live), live, dead(live)]
    async with Covey.open(
        "human:ada", world.home, amqp_urls=urls, amqp_order="listed", state_dir=world.state_dir
    ) as ada:
        await ada.send("scout", "from python")
        assert (await ada.gateway()).url == live
    # Not even aiormq's own line for the dead node, which a program with no logging set
    # up would print on stderr (pytest takes log records itself, so both are looked at).
    assert capfd.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert subjects(world) == ["from python"]


def test_a_node_that_never_answers_does_not_use_up_the_time_of_the_next(
    applied: World, silent: int
) -> None:
    world = applied
    live = world.amqp_url
    listed(world, str(URL(live).with_port(silent)), live)
    world.extra_env["COVEY_CONNECT_TIMEOUT"] = "6"  # 3 s for the silent node, 3+ for the live
    started = time.monotonic()
    result = world.covey("send", "scout", "after the silent one")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert 2.5 < elapsed < 30, elapsed  # it waited for its share, then moved on
    assert subjects(world) == ["after the silent one"]


def test_no_node_answering_is_exit_4_in_one_line_naming_them_all(world: World, silent: int) -> None:
    live = world.amqp_url
    urls = [dead(live), str(URL(live).with_port(silent)), dead(live)]
    world.amqp_url = urls[0]  # COVEY_AMQP_URL: one of the list
    listed(world, *urls)
    world.extra_env["COVEY_CONNECT_TIMEOUT"] = "3"
    started = time.monotonic()
    result = world.covey("send", "scout", "anyone?")
    elapsed = time.monotonic() - started
    assert result.returncode == 4
    line = one_line(result.stderr)
    assert "cannot reach RabbitMQ at any of" in line
    for url in urls:
        assert str(URL(url).with_password("***")) in line
    assert "guest:guest" not in line  # the password is redacted
    assert elapsed < 3 + 15, elapsed  # connect_timeout bounds the whole, plus start-up


def test_send_timeout_bounds_the_whole_list(world: World, silent: int) -> None:
    quiet = str(URL(world.amqp_url).with_port(silent))
    world.amqp_url = quiet
    listed(world, quiet, quiet)  # two nodes that never answer: 1 s each, 2 s in all
    started = time.monotonic()
    result = world.covey("send", "scout", "in time?", "--timeout", "2")
    elapsed = time.monotonic() - started
    assert result.returncode == 4, result.stderr
    assert "cannot reach RabbitMQ at any of" in one_line(result.stderr)
    assert 1.5 < elapsed < 2 + 15, elapsed


def test_a_refused_login_is_not_tried_on_the_other_nodes(world: World) -> None:
    wrong = world.amqp_url.replace("guest:guest", "guest:wrong")
    world.amqp_url = wrong
    listed(world, wrong, dead(wrong))
    result = world.covey("inbox", "--as", "scout")
    assert result.returncode == 4
    line = one_line(result.stderr)
    assert "refused the login" in line and "any of" not in line


# -- settings -----------------------------------------------------------------------


def test_amqp_urls_in_covey_toml_are_used(applied: World) -> None:
    world = applied
    live = world.amqp_url
    (world.home / "covey.toml").write_text(
        f'identity = "human:ada"\namqp_urls = ["{dead(live)}", "{live}"]\n'
        'amqp_order = "listed"\n\n[humans.ada]\n'
    )
    env = world.env
    del env["COVEY_AMQP_URL"]
    result = world.covey("send", "scout", "from the toml's list", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert subjects(world) == ["from the toml's list"]


def test_covey_amqp_url_in_the_environment_beats_amqp_urls_in_covey_toml(
    applied: World,
) -> None:
    world = applied
    nowhere = dead(world.amqp_url)
    (world.home / "covey.toml").write_text(
        f'identity = "human:ada"\namqp_urls = ["{nowhere}"]\n\n[humans.ada]\n'
    )
    world.ok("send", "scout", "env wins")  # COVEY_AMQP_URL is the live broker
    assert subjects(world) == ["env wins"]


@pytest.mark.parametrize("where", ["env", "toml"])
def test_a_bad_entry_is_a_one_line_config_error_naming_it(world: World, where: str) -> None:
    live = world.amqp_url
    env = world.env
    if where == "env":
        env["COVEY_AMQP_URLS"] = f"{live},http://{URL(live).host}:5672/"
        expected = "environment variable COVEY_AMQP_URLS: amqp_urls: entry 2 (http://"
    else:
        del env["COVEY_AMQP_URL"]
        (world.home / "covey.toml").write_text(
            f'amqp_urls = ["{live}", "amqp://guest:guest@localhost:port/"]\n[humans.ada]\n'
        )
        expected = "covey.toml: amqp_urls: entry 2 (amqp://guest:***@localhost:port/): not a URL"
    result = world.covey("inbox", "--as", "scout", env=env)
    assert result.returncode == 2
    assert expected in one_line(result.stderr)


def test_entries_with_other_logins_or_vhosts_are_refused(world: World) -> None:
    live = world.amqp_url
    listed(world, live, str(URL(live).with_path("/elsewhere")))
    result = world.covey("inbox", "--as", "scout")
    assert result.returncode == 2
    assert "entry 2" in (line := one_line(result.stderr)) and "user, password or vhost" in line


def test_covey_amqp_url_outside_covey_amqp_urls_is_refused(world: World) -> None:
    live = world.amqp_url
    listed(world, dead(live))  # COVEY_AMQP_URL (the live one) is not in it
    result = world.covey("inbox", "--as", "scout")
    assert result.returncode == 2
    assert "COVEY_AMQP_URL and COVEY_AMQP_URLS both name the broker" in one_line(result.stderr)


def test_notify_finds_the_mailbox_with_amqp_urls(world: World) -> None:
    """notify reads settings without pydantic: with the vhost given only in amqp_urls
    (the environment's, or covey.toml's) it must land on the file Covey uses."""
    from coordinator.notify import _mailbox

    live = world.amqp_url
    urls = [dead(live), live]
    scout = Covey.open("scout", home=world.home, amqp_urls=urls, state_dir=world.state_dir)
    expected = scout.store.path
    scout.store.close()
    with pytest.MonkeyPatch.context() as env:
        for key, value in world.env.items():
            env.setenv(key, value)
        env.delenv("COVEY_AMQP_URL")
        env.setenv("COVEY_AMQP_URLS", ",".join(urls))
        env.chdir(world.home)
        assert _mailbox("scout") == expected
        env.delenv("COVEY_AMQP_URLS")
        quoted = ", ".join(f'"{url}"' for url in urls)
        (world.home / "covey.toml").write_text(f"amqp_urls = [{quoted}]\n[humans.ada]\n")
        assert _mailbox("scout") == expected


def test_a_login_applies_to_every_node() -> None:
    settings = Settings(
        amqp_urls=["amqp://op:secret@node1:5672/prod", "amqps://op:secret@node2:5671/prod"]
    )
    mine = settings.with_login("amqp://covey.agent.scout:pw@node1:5672/prod")
    assert mine.broker_urls == [
        "amqp://covey.agent.scout:pw@node1:5672/prod",
        "amqps://covey.agent.scout:pw@node2:5671/prod",
    ]
    assert mine.amqp_url == mine.broker_urls[0]


def test_the_node_of_a_lost_connection_is_tried_last() -> None:
    a, b, c = (f"amqp://guest:guest@node{n}:5672/" for n in "abc")
    settings = Settings(amqp_urls=[a, b, c], amqp_order="listed")
    assert ordered(settings) == [a, b, c]
    assert ordered(settings, avoid="amqp://guest:guest@nodea:5672/") == [b, c, a]
    shuffled = Settings(amqp_urls=[a, b, c])  # the default: shuffled for each connection
    orders = {tuple(ordered(shuffled, avoid=b)) for _ in range(200)}
    assert {order[-1] for order in orders} == {b} and len(orders) == 2


# -- provisioned credentials ------------------------------------------------------------


def test_a_provisioned_agent_gets_its_login_at_every_node(secured: World, tmp_path: Path) -> None:
    """The credentials file keeps one URL; the supervisor hands the agent that login at
    every configured node, and the agent's own covey skips the dead one."""
    world = secured
    live = world.amqp_url
    nowhere = dead(live)
    seen = tmp_path / "urls"
    world.add_agent(
        "echo",
        f'command = \'echo "$COVEY_AMQP_URLS" > {seen} && covey send loner "from echo"\'\n',
    )
    world.ok("provision", "--host", "testhost")  # echo joined the roster
    world.extra_env["COVEY_AMQP_ORDER"] = "listed"
    # The supervisor host's own login, at both nodes, the dead one first.
    supervisor = URL(credentials(world, "supervisor.testhost"))
    env = {
        **world.env,
        "COVEY_AMQP_URLS": f"{supervisor.with_port(URL(nowhere).port)},{supervisor}",
    }
    del env["COVEY_AMQP_URL"]
    result = world.covey("run", "echo", env=env)
    assert result.returncode == 0, result.stderr
    echo = URL(credentials(world, "agent.echo"))
    assert seen.read_text().strip().split(",") == [
        str(echo.with_port(URL(nowhere).port)),
        str(echo),
    ]
    inbox = json.loads(
        world.ok("inbox", "--as", "loner", "--json", env=as_user(world, "agent.loner"))
    )
    assert [(m["subject"], m["sender"]) for m in inbox] == [("from echo", "agent:echo")]
    assert user_named(world, "agent.echo") in str(echo)


# -- moving to another node ------------------------------------------------------------


@pytest.mark.slow
async def test_tls_node_first_then_its_loss_moves_the_client_to_the_next(
    applied: World, vhost: str, tmp_path: Path
) -> None:
    """A private node over TLS listed first, the machine's broker second: mail goes to the
    first; the first stops; the same client's next send lands on the second."""
    world = applied
    files = self_signed(tmp_path)
    with LocalBroker(tls=files) as node:
        node.ctl("add_vhost", vhost)
        node.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        first = str(URL(node.tls_url).with_path(f"/{vhost}"))
        urls = [first, world.amqp_url]
        async with Covey.open(
            "human:ada",
            world.home,
            amqp_urls=urls,
            amqp_order="listed",
            tls_ca=files.ca,
            state_dir=world.state_dir,
        ) as ada:
            await ada.send("scout", "to the first node")  # declares what it needs there
            gateway = await ada.gateway()
            assert URL(gateway.url).port == node.tls_port
            lost = asyncio.Event()
            gateway.on_lost(lost.set)
            node.stop()
            async with asyncio.timeout(30):
                await lost.wait()
            await ada.send("scout", "to the second node")
            assert (await ada.gateway()).url == world.amqp_url
    assert subjects(world) == ["to the second node"]  # the machine's broker has only it
