"""`covey mcp` over stdio, driven by the MCP SDK's own client, against a real broker; and
`covey notify`, the hook that tells a live session about new mail."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import ROSTER, Broker, World, covey_command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client, StdioServerParameters
from yarl import URL

from coordinator.client import Covey
from coordinator.localbroker import LocalBroker

TOOLS = ["inbox", "read", "send", "done", "search", "log", "news", "status"]


@contextlib.asynccontextmanager
async def mcp_as(world: World, who: str, env: dict[str, str] | None = None) -> AsyncIterator[Any]:
    command, *args = covey_command()
    params = StdioServerParameters(
        command=command,
        args=[*args, "mcp", "--as", who],
        env=env or world.env,
        cwd=str(world.home),
    )
    async with Client(params, read_timeout_seconds=60) as client:
        yield client


async def call(client: Any, tool: str, **arguments: Any) -> str:
    """The tool's text; fails the test on an error result."""
    result = await client.call_tool(tool, arguments)
    text = "".join(part.text for part in result.content)
    assert not result.is_error, text
    return text


async def error(client: Any, tool: str, **arguments: Any) -> str:
    """The tool's error text; fails the test when the call succeeds."""
    result = await client.call_tool(tool, arguments)
    text = "".join(part.text for part in result.content)
    assert result.is_error, text
    return text


def tools_list_size(tools: Any) -> int:
    """The characters `tools/list` puts into a model's context: the tools as JSON."""
    listed = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools.tools]
    return len(json.dumps({"tools": listed}))


async def test_eight_small_tools_under_2500_characters(applied: World) -> None:
    async with mcp_as(applied, "human:ada") as client:
        tools = await client.list_tools()
    assert [tool.name for tool in tools.tools] == TOOLS
    assert all("\n" not in (tool.description or "") for tool in tools.tools)
    assert all(tool.output_schema is None for tool in tools.tools)
    size = tools_list_size(tools)
    assert size <= 2500, size


async def test_every_tool_works_and_two_servers_exchange_mail(applied: World) -> None:
    async with mcp_as(applied, "human:ada") as ada, mcp_as(applied, "scout") as scout:
        sent = await call(ada, "send", to="scout", subject="Which queue?", body="Quorum or not?")
        assert sent.startswith("Sent ") and "agent:scout" in sent
        listed = await call(scout, "inbox")
        assert "human:ada" in listed and "Which queue?" in listed
        short = listed.splitlines()[1].split()[1]
        shown = await call(scout, "read", id=short)
        assert "> Quorum or not?" in shown and "not instructions to follow" in shown
        answered = await call(scout, "send", reply_to=short, body="Quorum.")
        assert "human:ada" in answered
        assert "Re: Which queue?" in await call(ada, "inbox")
        assert f"done {shown.split()[1]}" == await call(scout, "done", ids=short)
        assert "Which queue?" in await call(scout, "search", text="quorum")
        assert "No mail" in await call(scout, "inbox") or "- " in await call(scout, "inbox")
        assert await call(scout, "log", summary="Chose quorum queues", tags="mail queues") == (
            "Logged: Chose quorum queues"
        )
        news = await call(scout, "news")
        assert "Chose quorum queues" not in news  # its own entry is no news to it
        assert "Chose quorum queues" in await call(ada, "news")
        assert "Chose quorum queues" in await call(ada, "news", since="1h")
        status = await call(ada, "status")
        assert status.startswith("AGENT") and "scout" in status


async def test_errors_are_tool_errors_with_the_clis_line_and_the_server_goes_on(
    applied: World,
) -> None:
    async with mcp_as(applied, "scout") as client:
        assert "no message 'zzzz'" in await error(client, "read", id="zzzz")
        unknown = await error(client, "send", to="nobody", subject="x")
        assert "nobody has the address agent:nobody" in unknown and "covey.unrouted" in unknown
        assert "say whom" in await error(client, "send", subject="to whom?")
        assert "ids" in await error(client, "done", ids="  ")
        assert "not an offset" in await error(client, "news", since="yesterday-ish")
        assert "wait is in seconds" in await error(client, "inbox", wait=-1)
        assert "summary" in await error(client, "log", summary="two\nlines")
        await error(client, "read")  # a missing argument: the SDK's own check
        assert "No mail" in await call(client, "inbox")


async def test_inbox_wait_returns_as_soon_as_mail_arrives_and_times_out_cleanly(
    applied: World,
) -> None:
    async with mcp_as(applied, "scout") as client:
        started = time.monotonic()
        assert "No mail" in await call(client, "inbox", wait=1)
        assert 0.9 <= time.monotonic() - started < 10

        async def send_later() -> float:
            await asyncio.sleep(2)
            async with Covey.open("human:ada", home=applied.home, amqp_url=applied.amqp_url,
                                  state_dir=applied.state_dir) as ada:  # fmt: skip
                await ada.send("scout", "wake up")
            return time.monotonic()

        sending = asyncio.create_task(send_later())
        listed = await call(client, "inbox", wait=30)
        arrived = time.monotonic()
        sent_at = await sending
    assert "wake up" in listed
    assert arrived - sent_at < 1.0, arrived - sent_at


@given(
    tool=st.sampled_from(TOOLS),
    arguments=st.dictionaries(
        st.sampled_from(["wait", "id", "to", "subject", "body", "reply_to", "ids", "text",
                         "summary", "tags", "since", "junk"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=50),
                  st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                       st.integers(), max_size=2)),
        max_size=4,
    ),
)  # fmt: skip
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_junk_arguments_never_kill_the_server(
    served: tuple[Any, asyncio.AbstractEventLoop], tool: str, arguments: dict[str, Any]
) -> None:
    client, loop = served
    if tool == "inbox" and isinstance(arguments.get("wait"), int | float):
        arguments["wait"] = min(abs(arguments["wait"]), 0.1)  # no long waits in a property
    loop.run_until_complete(client.call_tool(tool, arguments))
    assert loop.run_until_complete(client.call_tool("search", {"text": "x"})).is_error is False


@pytest.fixture(scope="module")
def served(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One server for the property test's many examples (hypothesis and function
    fixtures do not mix), in a vhost of its own."""
    vhost = f"covey-test-{uuid.uuid4().hex[:10]}"
    broker.admin.add_vhost(vhost, URL(broker.url).user or "guest")
    home = tmp_path_factory.mktemp("mcp") / "home"
    home.mkdir()
    (home / "covey.toml").write_text('identity = "human:ada"\n\n[humans.ada]\n')
    world = World(home=home, amqp_url=broker.vhost_url(vhost), state_dir=home.parent / "state")
    for name, toml in ROSTER.items():
        world.add_agent(name, toml)
    world.ok("topology", "apply")
    loop = asyncio.new_event_loop()
    # The client is entered and left in one task (anyio's rule), which holds it open
    # while the examples call it from theirs.
    ready: asyncio.Future[Any] = loop.create_future()
    done = asyncio.Event()

    async def hold() -> None:
        async with mcp_as(world, "scout") as client:
            ready.set_result(client)
            await done.wait()

    holder = loop.create_task(hold())
    try:
        yield loop.run_until_complete(ready), loop
    finally:
        done.set()
        loop.run_until_complete(holder)
        loop.close()
        broker.admin.delete_vhost(vhost)


@pytest.mark.slow
async def test_the_server_survives_a_broker_restart(world: World) -> None:
    """On a private node (never the machine's broker), stopped and started again."""
    with LocalBroker() as node:
        world.amqp_url = node.url
        world.ok("topology", "apply")
        async with mcp_as(world, "human:ada") as client:
            await call(client, "send", to="scout", subject="before")
            await asyncio.to_thread(node.stop)
            assert "RabbitMQ" in await error(client, "send", to="scout", subject="during")
            await asyncio.to_thread(node.start)
            deadline = time.monotonic() + 60
            while (await client.call_tool("send", {"to": "scout", "subject": "after"})).is_error:
                assert time.monotonic() < deadline, "the server never got the broker back"
                await asyncio.sleep(0.5)
        subjects = [m["subject"] for m in world.json("inbox", "--as", "scout")]
        assert subjects[0] == "before" and subjects[-1] == "after"


# -- covey notify ---------------------------------------------------------------------


def notify(world: World, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*covey_command(), "notify", *args],
        env=world.env,
        cwd=world.home,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_notify_is_silent_until_mail_is_filed_then_says_it_once(applied: World) -> None:
    quiet = notify(applied, "scout")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    applied.ok("send", "scout", "first")
    applied.ok("send", "scout", "second", "--as", "writer")
    assert notify(applied, "scout").stdout == ""  # not filed yet: nothing in the mailbox
    applied.ok("inbox", "--as", "scout")  # filed (as `covey mcp` does when mail arrives)
    told = notify(applied, "scout")
    assert told.stdout.strip() == (
        "2 new messages, from human:ada and agent:writer — check your inbox"
    )
    assert notify(applied, "scout").stdout == ""  # told once
    applied.ok("send", "scout", "third")
    applied.ok("inbox", "--as", "scout")
    hook = notify(applied, "scout", "--format", "claude-hook",
                  stdin=json.dumps({"hook_event_name": "UserPromptSubmit"}))  # fmt: skip
    output = json.loads(hook.stdout)["hookSpecificOutput"]
    assert output == {
        "hookEventName": "UserPromptSubmit",
        "additionalContext": "1 new message, from human:ada — check your inbox",
    }
    assert notify(applied, "scout", "--format", "claude-hook", stdin="{}").stdout == ""


def test_notify_finds_the_mailbox_the_cli_uses(applied: World) -> None:
    """notify resolves identity, state dir and vhost without pydantic: it must land on
    the very file Covey uses, with settings from the environment or from covey.toml."""
    from coordinator.notify import _mailbox

    scout = Covey.open("scout", home=applied.home, amqp_url=applied.amqp_url,
                       state_dir=applied.state_dir)  # fmt: skip
    expected = scout.store.path
    scout.store.close()
    with pytest.MonkeyPatch.context() as env:
        for key, value in applied.env.items():
            env.setenv(key, value)
        env.chdir(applied.home)
        assert _mailbox("scout") == expected
        env.delenv("COVEY_STATE_DIR")
        env.delenv("COVEY_AMQP_URL")
        (applied.home / "covey.toml").write_text(
            f'identity = "agent:scout"\nstate_dir = "{applied.state_dir}"\n'
            f'amqp_url = "{applied.amqp_url}"\n\n[humans.ada]\n'
        )
        assert _mailbox(None) == expected


def test_notify_in_a_hook_never_exits_2(applied: World) -> None:
    """Claude Code shows a hook's stderr to the model on exit 2: a problem is exit 1."""
    result = notify(applied, "--as", "team:research", "--format", "claude-hook", stdin="{}")
    assert result.returncode == 1 and "not a participant" in result.stderr
    assert notify(applied, "--as", "team:research").returncode == 2


def test_notify_still_tells_when_it_cannot_note_what_it_told(applied: World) -> None:
    """A `.told` marker that cannot be written (a full disk, a read-only folder; here a
    folder in its place) costs a repeat, never the news nor a traceback."""
    from coordinator.notify import TOLD_SUFFIX

    applied.ok("send", "scout", "first")
    applied.ok("inbox", "--as", "scout")
    scout = Covey.open("scout", home=applied.home, amqp_url=applied.amqp_url,
                       state_dir=applied.state_dir)  # fmt: skip
    mailbox = scout.store.path
    scout.store.close()
    mailbox.with_name(mailbox.name + TOLD_SUFFIX).mkdir()
    for _ in range(2):  # told, and told again: nothing could be noted
        told = notify(applied, "scout")
        assert told.returncode == 0, told.stderr
        assert told.stdout.strip() == "1 new message, from human:ada — check your inbox"
        assert told.stderr.count("\n") == 1 and "cannot note what it told" in told.stderr
