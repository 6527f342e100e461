"""Figures 15: `covey mcp` — what a call costs over stdio with the MCP SDK's own client,
against the cold CLI doing the same and against raw aio-pika on a warm connection; what
its tool definitions cost a model's context; and `covey notify` cold when nothing is new."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import aio_pika
from benchlib import BODY_512, COVEY, PYTHON, Bench, Figure, covey_env, wall_time, write_home
from benchlib import percentile as pct
from mcp import Client, StdioServerParameters

from coordinator.client import Covey

# mcp_agent_mail, the best-known tool in this space: 48 tools, about 24,700 tokens of
# definitions in every session (its issue #54); its "profiles" still about 11,000
# characters of descriptions. Published figures, not measured here.
AGENT_MAIL_TOKENS = 24_700

# The SDK's own floor: a server whose one tool does nothing, over the same stdio.
ECHO_SERVER = """
from mcp.server import MCPServer
server = MCPServer(name="echo")

@server.tool(structured_output=False, description="Echo.")
async def echo(text: str = "") -> str:
    return text

server.run()
"""
CHARS_PER_TOKEN = 4  # the usual rough estimate for English and JSON


async def bench_mcp(bench: Bench) -> list[Figure]:
    calls = 20 if bench.quick else 200
    cold = 1 if bench.quick else 5
    url = await bench.vhost()
    home = write_home(bench.folder("mcp"), {"sink": []})
    env = covey_env(home, url)
    async with Covey.open("human:ada", home=home, amqp_url=url, state_dir=home / "state") as ada:
        await ada.namespace.apply_topology()
        await ada.send("human:ada", "to read", BODY_512)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue("raw.sink", durable=True, arguments={"x-queue-type": "quorum"})
        message = aio_pika.Message(
            BODY_512.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )

        async def raw_send() -> float:
            started = time.perf_counter()
            await channel.default_exchange.publish(message, "raw.sink")
            return time.perf_counter() - started

        params = StdioServerParameters(command=COVEY, args=["mcp", "--as", "human:ada"], env=env)
        echo_params = StdioServerParameters(command=PYTHON, args=["-c", ECHO_SERVER], env=env)
        async with Client(params, read_timeout_seconds=60) as client, Client(echo_params) as echo:
            tools = await client.list_tools()
            listed = json.dumps(
                {"tools": [t.model_dump(mode="json", by_alias=True, exclude_none=True)
                           for t in tools.tools]}
            )  # fmt: skip
            inbox = await _text(client, "inbox", {})
            message_id = inbox.splitlines()[1].split()[1]
            timings: dict[str, list[float]] = {name: [] for name in ("read", "search", "inbox")}
            timings["send"], raw, floor = [], [], []
            for _ in range(calls):  # interleaved, so a noisy machine hits all alike
                timings["read"].append(await _call(client, "read", {"id": message_id}))
                timings["search"].append(await _call(client, "search", {"text": "read"}))
                timings["inbox"].append(await _call(client, "inbox", {}))
                timings["send"].append(
                    await _call(client, "send", {"to": "sink", "subject": "x", "body": BODY_512})
                )
                raw.append(await raw_send())
                floor.append(await _call(echo, "echo", {"text": "read"}))
    cold_env = {**env}
    cli: dict[str, list[float]] = {"read": [], "send": []}
    as_ada = ["--as", "human:ada"]
    for _ in range(cold):
        cli["read"].append(await wall_time([COVEY, "read", message_id, *as_ada], env))
        cli["send"].append(await wall_time([COVEY, "send", "sink", "x", *as_ada], env))
    notify = [
        await wall_time([COVEY, "notify", "--as", "human:ada"], cold_env) for _ in range(cold * 2)
    ]
    bare = [await wall_time([PYTHON, "-c", "pass"], dict(os.environ)) for _ in range(cold)]
    return [
        *_call_figures(timings, cli, raw, floor),
        Figure(
            "15e",
            "`tools/list`: the tool definitions a model carries",
            "chars",
            len(listed),
            None,
            "≤ 2,500 chars",
            max_value=2500,
            note=f"{len(tools.tools)} tools, about {len(listed) // CHARS_PER_TOKEN} tokens; "
            f"mcp_agent_mail: 48 tools, about {AGENT_MAIL_TOKENS:,} tokens (published)",
            extra={"tools": len(tools.tools), "tokens_estimate": len(listed) // CHARS_PER_TOKEN},
        ),
        Figure(
            "15f",
            "cold `covey notify`, nothing new",
            "ms",
            statistics.median(notify) * 1000,
            statistics.median(bare) * 1000,
            "≤ 100 ms",
            max_value=100,
            note="raw: a bare `python -c pass`, the floor for any Python command",
            extra={"runs_ms": [round(x * 1000, 1) for x in notify]},
        ),
    ]


def _call_figures(
    timings: dict[str, list[float]],
    cli: dict[str, list[float]],
    raw: list[float],
    floor: list[float],
) -> list[Figure]:
    """read, search, inbox against the SDK's floor (a tool that does nothing); send
    against a confirmed publish on a warm connection."""
    ms = 1000
    figures = []
    for n, name in enumerate(("read", "search", "inbox")):
        runs = timings[name]
        cold = cli.get(name)
        note = (
            f"p99 {pct(runs, 99) * ms:.1f} ms; raw: the SDK's own round trip, a tool doing nothing"
        )
        if cold:
            note += f"; the cold CLI: {statistics.median(cold) * ms:.0f} ms"
        figures.append(
            Figure(
                f"15{'abc'[n]}",
                f"`covey mcp` {name}, over stdio",
                "ms",
                statistics.median(runs) * ms,
                statistics.median(floor) * ms,
                "≤ 3 ms" if name != "inbox" else "reported",
                max_value=3 if name != "inbox" else None,
                note=note + ("; asks the broker for new mail first" if name == "inbox" else ""),
                extra={"p99_ms": round(pct(runs, 99) * ms, 2), "calls": len(runs)},
            )
        )
    send, raw_send = statistics.median(timings["send"]) * ms, statistics.median(raw) * ms
    figures.append(
        Figure(
            "15d",
            "`covey mcp` send, over stdio (raw: a confirmed publish on a warm connection)",
            "ms",
            send,
            raw_send,
            "≤ raw + 2 ms",
            max_value=raw_send + 2,
            note=f"p99 {pct(timings['send'], 99) * ms:.1f} ms against raw "
            f"{pct(raw, 99) * ms:.1f} ms; the cold CLI: "
            f"{statistics.median(cli['send']) * ms:.0f} ms",
            extra={"p99_ms": round(pct(timings["send"], 99) * ms, 2)},
        )
    )
    return figures


async def _call(client: Any, tool: str, arguments: dict[str, Any]) -> float:
    started = time.perf_counter()
    result = await client.call_tool(tool, arguments)
    took = time.perf_counter() - started
    if result.is_error:
        raise RuntimeError(f"{tool}: {result.content}")
    return took


async def _text(client: Any, tool: str, arguments: dict[str, Any]) -> str:
    result = await client.call_tool(tool, arguments)
    return "".join(part.text for part in result.content)
