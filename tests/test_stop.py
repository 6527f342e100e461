"""`covey stop`: a live run stopped from another process, by run id or by agent, under
`covey run` and under `covey supervise`; who asked and why kept where the run is recorded;
nothing to stop is one line and its own exit code; in a provisioned namespace a person
may stop a run and an agent may stop none, and nobody can name someone else as the asker.
Real broker, real `covey` processes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from typing import Any

import aio_pika
import aiormq
import pytest
from conftest import World, start
from test_attach import Output
from test_run import wait_for
from test_security import as_user, credentials, secured, user_named

from coordinator.events import Event

__all__ = ["secured"]  # the fixture, used here by name

# Prints a numbered tick every 0.1 s, for a minute: long enough to be stopped. Holds
# no shared lock, so that two of them run at once.
TICKER = (
    'command = "for i in $(seq 600); do echo tick $i; sleep 0.1; done"\n'
    'grace = "2s"\nlock = "none"\n'
)


def start_run(world: World, agent: str) -> Output:
    """`covey run AGENT` in the background, once its agent has printed its first tick."""
    out = Output(start(world, "run", agent))
    out.wait_for(lambda text: text.startswith("tick"))
    return out


def finish(out: Output, timeout: float = 30.0) -> int:
    """The run's exit code, once it has ended (within `timeout` s)."""
    return out.process.wait(timeout=timeout)


def ended(out: Output) -> None:
    """After the test, whatever happened: the run is gone."""
    if out.process.poll() is None:
        out.process.kill()
        out.process.wait()


def last_run(world: World, agent: str) -> dict[str, Any]:
    runs: list[dict[str, Any]] = world.json("runs", agent)
    return runs[-1]


def test_stop_by_agent_name_stops_its_run_and_says_who_and_why(applied: World) -> None:
    applied.add_agent("ticker", TICKER)
    run = start_run(applied, "ticker")
    try:
        asked = time.monotonic()
        stopped = applied.covey("stop", "ticker", "--reason", "wrong branch")
        took = time.monotonic() - asked
        assert stopped.returncode == 0, stopped.stderr
        assert "Stopped ticker run" in stopped.stdout
        assert "stopped by human:ada: wrong branch" in stopped.stdout
        assert finish(run) == 1  # `covey run` of a stopped run: exit 1, as for SIGTERM
    finally:
        ended(run)
    assert took < 15, took  # SIGTERM ends the shell at once; nowhere near its grace
    record = last_run(applied, "ticker")
    assert record["outcome"] == "stopped"
    assert record["stopped_by"] == "human:ada"
    assert record["reason"] == "stopped by human:ada: wrong branch"
    ticks = [t for t in run.texts() if t.startswith("tick")]
    assert len(ticks) < 300, "the agent ran on after the stop"
    # The session says it too: its `closed` event carries the outcome and the reason.
    shown = applied.covey("attach", record["run_id"], "--json")
    assert shown.returncode == 0, shown.stderr
    closed = json.loads(shown.stdout.splitlines()[-1])
    assert closed["kind"] == "closed" and closed["data"]["outcome"] == "stopped"
    assert "wrong branch" in json.dumps(closed["data"])


def test_stop_by_run_id_under_a_supervisor_stops_that_run_only(applied: World) -> None:
    applied.add_agent("ticker", TICKER)
    applied.add_agent("other", TICKER)
    supervisor = start(applied, "supervise", "--no-metrics", stdout=subprocess.DEVNULL)
    try:
        for agent in ("ticker", "other"):
            wait_for(
                lambda agent=agent: applied.covey("run", agent, "--via-supervisor").returncode == 0,
                timeout=30,
            )
        for agent in ("ticker", "other"):
            wait_for(lambda agent=agent: _running(applied, agent), timeout=30)
        run_id = last_run(applied, "ticker")["run_id"]
        result = applied.json("stop", run_id)
        assert result["outcome"] == "stopped" and result["run_id"] == run_id
        assert result["stopped_by"] == "human:ada" and result["agent"] == "ticker"
        # The other agent's run, under the same supervisor, goes on.
        time.sleep(1.0)
        assert last_run(applied, "other")["outcome"] == "running"
        assert supervisor.poll() is None
        assert applied.json("stop", "other")["outcome"] == "stopped"
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.communicate(timeout=60)


def _running(world: World, agent: str) -> bool:
    runs = world.json("runs", agent)
    return bool(runs) and runs[-1]["outcome"] == "running"


def test_nothing_to_stop_is_one_line_and_its_own_exit_code(applied: World) -> None:
    applied.add_agent("quick", 'command = "echo done"\n')
    assert applied.covey("run", "quick").returncode == 0
    run_id = last_run(applied, "quick")["run_id"]
    for target in ("quick", run_id, "loner"):
        result = applied.covey("stop", target)
        assert result.returncode == 10, (target, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "nothing to stop" in result.stderr
    unknown = applied.covey("stop", "20260101T000000-abcdef")
    assert unknown.returncode == 2 and "no run" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1


async def test_a_request_for_another_run_of_the_agent_is_not_this_runs(applied: World) -> None:
    """An old stop request (an earlier run of the same agent) does not stop the live one."""
    applied.add_agent("ticker", TICKER)
    run = start_run(applied, "ticker")
    try:
        wait_for(lambda: _running(applied, "ticker"), timeout=30)
        stale = Event(
            kind="stop.requested", host="test", agent="ticker", run_id="20200101T000000-000000"
        )
        await _publish_event(applied.amqp_url, stale)
        time.sleep(1.0)
        assert run.process.poll() is None
        assert applied.json("stop", "ticker")["outcome"] == "stopped"
    finally:
        ended(run)


async def _publish_event(url: str, event: Event) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("covey.events", ensure=False)
        body = event.model_dump_json(exclude_none=True).encode()
        await exchange.publish(aio_pika.Message(body), event.routing_key)


# -- provisioned: the broker decides who may stop ------------------------------------------


def test_in_a_provisioned_namespace_a_person_stops_and_an_agent_cannot(secured: World) -> None:
    world = secured
    world.add_agent("ticker", TICKER)
    world.ok("provision", "--host", "testhost")  # ticker joined the roster
    run = start_run(world, "ticker")
    try:
        wait_for(lambda: _running(world, "ticker"), timeout=30)
        # scout, with its own credentials, tries to stop ticker's run: the broker refuses.
        scout = as_user(world, "agent.scout")
        refused = world.covey("stop", "ticker", "--as", "agent:scout", env=scout)
        assert refused.returncode == 4 and len(refused.stderr.strip().splitlines()) == 1
        assert "refused" in refused.stderr and "lacks the permission" in refused.stderr
        time.sleep(1.0)
        assert run.process.poll() is None and _running(world, "ticker")
        # ada, with hers, may.
        stopped = world.covey("stop", "ticker", "--json", env=as_user(world, "human.ada"))
        assert stopped.returncode == 0, stopped.stderr
        assert json.loads(stopped.stdout)["stopped_by"] == "human:ada"
        assert finish(run) == 1
    finally:
        ended(run)


async def test_an_agent_cannot_publish_a_stop_request_at_all(secured: World) -> None:
    """Behind covey's back, with plain aio-pika and scout's own credentials."""
    event = Event(
        kind="stop.requested", host="test", agent="writer", run_id="20260101T000000-abcdef"
    )
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await _publish_event(credentials(secured, "agent.scout"), event)


async def test_who_asked_is_what_the_broker_vouches_for_not_what_the_request_says(
    secured: World,
) -> None:
    """ada's user sends a stop claiming to come from bob: the record names ada's broker
    user, never bob."""
    world = secured
    world.add_agent("ticker", TICKER)
    world.ok("provision", "--host", "testhost")
    run = start_run(world, "ticker")
    try:
        wait_for(lambda: _running(world, "ticker"), timeout=30)
        run_id = last_run(world, "ticker")["run_id"]
        ada = user_named(world, "human.ada")
        forged = Event(
            kind="stop.requested",
            host="test",
            agent="ticker",
            run_id=run_id,
            requested_by="human:bob",
        )
        body = forged.model_dump_json(exclude_none=True).encode()
        connection = await aio_pika.connect(credentials(world, "human.ada"))
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange("covey.events", ensure=False)
            await exchange.publish(aio_pika.Message(body, user_id=ada), forged.routing_key)
        assert finish(run) == 1
    finally:
        ended(run)
    record = last_run(world, "ticker")
    assert record["outcome"] == "stopped"
    assert record["stopped_by"] == f"broker user {ada!r}"
    assert "bob" not in record["reason"]


async def test_a_stop_sent_the_moment_the_run_is_recorded_started_is_heard(
    applied: World,
) -> None:
    """The run listens for stops before it records `run.started`: a stop sent as soon as
    that event is seen is never refused as 'not listening'."""
    from coordinator.topology import EVENTS_EXCHANGE

    applied.add_agent("ticker", TICKER)
    async with applied.open("human:ada") as ada:
        gateway = await ada.gateway()
        channel = await gateway.open_channel()
        started: asyncio.Queue[Event] = asyncio.Queue()

        async def on_started(message: Any) -> None:
            started.put_nowait(Event.model_validate_json(message.body))

        await gateway.listen(channel, EVENTS_EXCHANGE, ["run.started.ticker"], on_started)
        run = Output(start(applied, "run", "ticker"))
        try:
            event = await asyncio.wait_for(started.get(), 60)
            finished = await ada.stop(event.run_id or "", reason="at once")
            assert finished.outcome == "stopped" and finished.stopped_by == "human:ada"
            assert await asyncio.to_thread(finish, run) == 1
        finally:
            ended(run)
            await channel.close()
