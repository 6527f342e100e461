"""`covey read`, `done` and `search` on one's own mailbox, without the namespace (offline.py):
the same answers as through the namespace, the namespace's errors whenever the identity is
not plain, and none of the heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import World
from yarl import URL

# Both ways in one process, on the same arguments: the quick one first, as `main` runs
# it, then through the namespace (`_run`), each with its exit status, stdout and stderr.
BOTH_WAYS = """
import asyncio, contextlib, io, json, sys
from coordinator import cli

def way(run):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run()
    return [code, out.getvalue(), err.getvalue()]

results = []
for argv in json.loads(sys.argv[1]):
    args = cli.build_parser().parse_args(argv)
    quick = way(lambda: cli._run_locally(cli._on_own_mailbox, args))
    results.append([quick, way(lambda: asyncio.run(cli._run(args)))])
print(json.dumps(results))
"""


def _python(
    script: str, world: World, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """`script` run by a Python of its own in the home, with `env`."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        cwd=world.home,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_read_done_and_search_import_neither_pydantic_nor_asyncio(applied: World) -> None:
    """What makes them cold-start in a third of the time: the mailbox alone, found with
    the standard library (the broker is not even asked: its port is shut)."""
    applied.ok("send", "scout", "offline soon", "--body", "needle in here")
    (mail,) = applied.json("inbox", "--as", "scout")
    env = {**applied.env, "COVEY_AMQP_URL": str(URL(applied.amqp_url).with_port(1))}
    probe = (
        "import sys\nfrom coordinator.cli import main\n"
        "code = main(['search', 'needle', '--as', 'scout'])\n"
        f"code |= main(['read', '{mail['id'][:8]}', '--as', 'scout'])\n"
        f"code |= main(['done', '{mail['id'][:8]}', '--as', 'scout'])\n"
        "heavy = {'pydantic', 'asyncio', 'aio_pika', 'structlog'} & set(sys.modules)\n"
        "assert not heavy, f'imported {sorted(heavy)}'\n"
        "sys.exit(code)\n"
    )
    result = _python(probe, applied, env)
    assert result.returncode == 0, result.stderr
    assert "offline soon" in result.stdout  # search's line
    assert "> needle in here" in result.stdout  # read's quoted body
    assert f"done {mail['id']}" in result.stdout
    assert applied.json("inbox", "--as", "scout") == []  # the done was kept


def test_the_quick_way_answers_as_the_namespace_does(applied: World) -> None:
    applied.ok("send", "scout", "first", "--body", "alpha words")
    applied.ok("send", "scout", "second", "--body", "beta words")
    first, second = applied.json("inbox", "--as", "scout")
    commands = [
        ["search", "words", "--as", "scout", "--json"],
        ["read", first["id"][:6], "--as", "scout", "--json"],
        ["read", second["id"], "--json"],  # COVEY_AGENT says who
        ["done", first["id"][:6], second["id"][:6], "--as", "agent:scout"],
        ["search", "words", "--as", "scout"],
        ["read", "ffffffff", "--as", "scout"],  # no such message: an error, both ways
    ]
    env = {**applied.env, "COVEY_AGENT": "scout"}
    result = _python(BOTH_WAYS, applied, env, json.dumps(commands))
    assert result.returncode == 0, result.stderr
    for argv, (quick, namespace) in zip(commands, json.loads(result.stdout), strict=True):
        assert quick == namespace, argv
    searched = json.loads(json.loads(result.stdout)[0][0][1])
    assert [m["subject"] for m in searched] == ["first", "second"]
    assert json.loads(result.stdout)[-1][0][0] != 0  # the missing message was refused


def test_an_identity_that_is_not_plain_gets_the_namespaces_own_error(applied: World) -> None:
    """The quick way stands aside; the answer is the one every command gives."""
    for identity, words in [
        ("nobody", "not in the roster"),
        ("team:research", "not a participant"),
        ("human:bob", "not in the roster"),
    ]:
        quick = applied.covey("search", "x", "--as", identity)
        send = applied.covey("send", "scout", "s", "--as", identity)
        assert quick.returncode == send.returncode != 0, (identity, quick.stderr)
        assert words in quick.stderr
        assert quick.stderr == send.stderr, identity
    no_one = applied.covey("search", "x", env={**applied.env, "COVEY_HOME": ""}, cwd=applied.home)
    assert no_one.returncode == 0  # the home is found from the working directory


def test_a_participant_whose_agent_toml_is_broken_still_reads_its_own_mail(
    applied: World,
) -> None:
    """The choice offline.py documents: reading one's own mailbox does not depend on one's
    agent.toml; commands that need the roster still refuse the broken agent."""
    applied.ok("send", "scout", "before the typo")
    applied.json("inbox", "--as", "scout")
    applied.add_agent("scout", 'teams = ["research"]\nschedul = "* * * * *"\n')
    found = applied.covey("search", "typo", "--as", "scout", "--json")
    assert found.returncode == 0, found.stderr
    assert [m["subject"] for m in json.loads(found.stdout)] == ["before the typo"]
    inbox = applied.covey("inbox", "--as", "scout")
    assert inbox.returncode != 0 and "schedul" in inbox.stderr
