"""Figure 4: the command line from a cold process — `covey send` and `covey inbox` against a
plain `python -c` script that imports aio-pika, connects and publishes (or gets); `covey
read`, `done` and `search`, which need no broker, against their target alone."""

from __future__ import annotations

import asyncio
import json
import os
import statistics

import aio_pika
from benchlib import (
    BODY_512,
    COVEY,
    ORIGINAL_ENV,
    PYTHON,
    Bench,
    Figure,
    covey_env,
    wall_time,
    write_home,
)

from coordinator.client import Covey

RAW_SEND = """
import asyncio, sys
import aio_pika

async def main():
    connection = await aio_pika.connect(sys.argv[1])
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        message = aio_pika.Message(sys.argv[2].encode(), delivery_mode=2)  # persistent
        await channel.default_exchange.publish(message, "raw.sink", mandatory=True)
    print("sent")

asyncio.run(main())
"""

RAW_INBOX = """
import asyncio, sys
import aio_pika

async def main():
    connection = await aio_pika.connect(sys.argv[1])
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("raw.sink", passive=True)
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            print(message.body[:40])

asyncio.run(main())
"""


def import_profile(stderr: str) -> tuple[float, dict[str, float]]:
    """From `-X importtime` output: seconds spent importing, and how they split by
    top-level package (each module's own time, so the shares add up)."""
    total = 0.0
    packages: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        own, _, name = (part for part in line[len("import time:") :].split("|"))
        seconds = int(own) / 1e6
        total += seconds
        top = name.strip().split(".")[0]
        packages[top] = packages.get(top, 0.0) + seconds
    return total, packages


async def _importtime(argv: list[str], env: dict[str, str]) -> tuple[float, float, dict]:
    """Wall time, import time and heaviest packages of one run under -X importtime."""
    env = {**env, "PYTHONPROFILEIMPORTTIME": "1"}
    started = asyncio.get_running_loop().time()
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await process.communicate()
    wall = asyncio.get_running_loop().time() - started
    total, packages = import_profile(err.decode())
    return wall, total, packages


async def bench_cli(bench: Bench) -> list[Figure]:
    repeats, probes = (1, 1) if bench.quick else (5, 3)
    url = await bench.vhost()
    home = write_home(bench.folder("cli"), {"sink": []})
    env = covey_env(home, url)
    plain_env = {k: v for k, v in os.environ.items() if not k.startswith("COVEY_")}
    async with Covey.open(home=home, amqp_url=url, state_dir=home / "state") as covey:
        await covey.namespace.apply_topology()
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue("raw.sink", durable=True, arguments={"x-queue-type": "quorum"})

    commands = {
        "send": (
            [COVEY, "send", "sink", "cold start", "--body", BODY_512],
            [PYTHON, "-c", RAW_SEND, url, BODY_512],
        ),
        "inbox": ([COVEY, "inbox", "--as", "sink"], [PYTHON, "-c", RAW_INBOX, url]),
    }
    if not bench.quick:
        await wall_time(commands["inbox"][0], env)  # the first inbox creates the mailbox
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in commands}
    for _ in range(repeats):  # covey send, raw send, covey inbox, raw inbox, …
        for name, (covey_argv, raw_argv) in commands.items():
            times[name][0].append(await wall_time(covey_argv, env))
            times[name][1].append(await wall_time(raw_argv, plain_env))

    # Where a cold command's time goes: the interpreter, imports, the rest.
    detail = not bench.quick  # the raw script's import share, and covey without bytecode
    startup = statistics.median(
        [await wall_time([PYTHON, "-c", "pass"], plain_env) for _ in range(probes)]
    )
    import_cli = (
        await wall_time([PYTHON, "-c", "import coordinator.cli"], plain_env) if detail else None
    )
    # As this machine's environment runs it: PYTHONDONTWRITEBYTECODE=1 and an editable
    # install mean covey's own modules are compiled from source on every command.
    as_is_env = {k: v for k, v in ORIGINAL_ENV.items() if not k.startswith("COVEY_")}
    as_is_env.update({k: v for k, v in env.items() if k.startswith("COVEY_")})
    figures = []
    for n, (name, (covey_argv, raw_argv)) in enumerate(commands.items()):
        profiled = [await _importtime(covey_argv, env) for _ in range(probes)]
        wall = statistics.median(p[0] for p in profiled)
        imports = statistics.median(p[1] for p in profiled)
        heaviest = sorted(profiled[0][2].items(), key=lambda kv: -kv[1])[:6]
        note = (
            f"imports {imports * 1000:.0f} of {wall * 1000:.0f} ms under -X importtime "
            f"({imports / wall:.0%}); bare interpreter {startup * 1000:.0f} ms; own import "
            "time by package: " + ", ".join(f"{pkg} {s * 1000:.0f}" for pkg, s in heaviest)
        )
        extra: dict[str, object] = {}
        if detail:
            raw_wall, raw_imports, _ = await _importtime(raw_argv, plain_env)
            as_is = await wall_time(covey_argv, as_is_env)
            note += (
                f"; raw script imports {raw_imports / raw_wall:.0%} of its time; covey "
                f"without cached bytecode {as_is * 1000:.0f} ms"
            )
            extra = {
                "raw_import_share": round(raw_imports / raw_wall, 3),
                "without_cached_bytecode_ms": round(as_is * 1000, 1),
                "import_coordinator_cli_ms": round((import_cli or 0) * 1000, 1),
            }
        covey_runs, raw_runs = times[name]
        figures.append(
            Figure(
                f"4{'ab'[n]}",
                f"cold `covey {name}` (subprocess)",
                "ms",
                statistics.median(covey_runs) * 1000,
                statistics.median(raw_runs) * 1000,
                "≤ 1.3 × raw",
                max_ratio=1.3,
                note=note,
                extra={
                    "covey_runs_ms": [round(x * 1000, 1) for x in covey_runs],
                    "raw_runs_ms": [round(x * 1000, 1) for x in raw_runs],
                    "importtime_wall_ms": round(wall * 1000, 1),
                    "import_ms": round(imports * 1000, 1),
                    "import_share": round(imports / wall, 3),
                    "own_import_ms_by_package": {pkg: round(s * 1000, 1) for pkg, s in heaviest},
                    "python_startup_ms": round(startup * 1000, 1),
                    **extra,
                },
            )
        )
    figures += await _mailbox_commands(bench, env, probes, repeats)
    return figures


async def _mailbox_commands(
    bench: Bench, env: dict[str, str], probes: int, repeats: int
) -> list[Figure]:
    """4c-4e: `covey read`, `done` and `search` on the mailbox the inbox above filled (the
    sink's sends), each cold; the broker is never asked (offline.py)."""
    (mail,) = json.loads(await _output([COVEY, "inbox", "--as", "sink", "--json"], env))[:1]
    commands = {
        "read": [COVEY, "read", mail["id"][:8], "--as", "sink"],
        "done": [COVEY, "done", mail["id"][:8], "--as", "sink"],
        "search": [COVEY, "search", "cold", "--as", "sink"],
    }
    startup = statistics.median(
        [await wall_time([PYTHON, "-c", "pass"], env) for _ in range(probes)]
    )
    figures = []
    for letter, (name, argv) in zip("cde", commands.items(), strict=True):
        runs = [await wall_time(argv, env) for _ in range(max(repeats, 3))]
        figures.append(
            Figure(
                f"4{letter}",
                f"cold `covey {name}` (no broker)",
                "ms",
                statistics.median(runs) * 1000,
                None,
                "≤ 100 ms",
                max_value=100,
                note=f"bare interpreter {startup * 1000:.0f} ms" if letter == "c" else "",
                extra={"runs_ms": [round(x * 1000, 1) for x in runs]},
            )
        )
    return figures


async def _output(argv: list[str], env: dict[str, str]) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()
