"""The changelog stream, cursors, and the digest injected when an agent starts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from conftest import World, start
from test_run import wait_for

from coordinator.localbroker import free_port

APPEND_MANY = """
import asyncio, sys
from coordinator.client import Covey

async def main(who: str, count: int) -> None:
    async with Covey.open(identity=who) as covey:
        for n in range(count):
            await covey.log_add(f"{who} change {n}")

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def log(world: World, *args: str) -> list[dict]:  # type: ignore[type-arg]
    return world.json("log", "--limit", "1000", *args)  # type: ignore[no-any-return]


def test_concurrent_appends_all_appear_once_in_offset_order(applied: World) -> None:
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", APPEND_MANY, who, "25"],
            env=applied.env,
            cwd=applied.home,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in ("agent:scout", "agent:writer", "agent:loner", "human:ada")
    ]
    for process in writers:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    entries = log(applied, "--since", "0")
    offsets = [e["offset"] for e in entries]
    assert offsets == sorted(set(offsets))  # strictly increasing: in order, none twice
    seen = [(e["author"], e["summary"]) for e in entries]
    assert len(seen) == len(set(seen)) == 100
    for who in ("agent:scout", "agent:writer", "agent:loner", "human:ada"):
        mine = [s for a, s in seen if a == who]
        assert mine == [f"{who} change {n}" for n in range(25)]  # each writer's order kept


def test_log_filters_by_author_tag_and_time(applied: World) -> None:
    applied.ok("log", "add", "infra change", "--tag", "infra", "--as", "scout")
    applied.ok("log", "add", "docs change", "--tag", "docs", "--as", "writer", "--body", "why")
    assert [e["summary"] for e in log(applied, "--author", "scout")] == ["infra change"]
    assert [e["summary"] for e in log(applied, "--tag", "docs")] == ["docs change"]
    assert log(applied, "--tag", "docs")[0]["body"] == "why"
    assert len(log(applied, "--since", "1h")) == 2
    assert log(applied, "--since", "2099-01-01T00:00") == []
    assert [e["summary"] for e in applied.json("log", "--limit", "1")] == ["docs change"]


def test_bad_log_input_is_exit_2_in_one_line(applied: World) -> None:
    for args in (["log", "add", "  "], ["log", "add", "x", "--tag", "Bad Tag"]):
        result = applied.covey(*args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    result = applied.covey("log", "--since", "yesterday-ish")
    assert result.returncode == 2 and "not an offset, an ISO time or a duration" in result.stderr


def reporter(world: World, name: str, extra: str = "") -> None:
    """An agent that prints what it was told at start (its digest file)."""
    world.add_agent(name, f'command = "cat $COVEY_DIGEST_FILE"\n{extra}')


def test_the_digest_is_what_others_wrote_since_the_cursor(applied: World) -> None:
    reporter(applied, "reader")
    applied.ok("log", "add", "before the first run", "--as", "scout")
    first = applied.ok("run", "reader")
    assert "before the first run" in first  # no cursor yet: the last entries
    applied.ok("log", "add", "news from scout", "--as", "scout")
    applied.ok("log", "add", "my own note", "--as", "reader")
    applied.ok("log", "add", "news from ada")
    digest = applied.json("digest", "reader")
    assert [e["summary"] for e in digest["entries"]] == ["news from ada", "news from scout"]
    assert digest["omitted"] == 0
    assert "before the first run" not in digest["text"] and "my own note" not in digest["text"]
    second = applied.ok("run", "reader")
    assert "news from ada" in second and "news from scout" in second
    assert "Nothing new since" in applied.ok("digest", "reader")


def test_own_entries_are_included_when_asked(applied: World) -> None:
    reporter(applied, "vain", "[digest]\ninclude_own = true\n")
    applied.ok("log", "add", "look at me", "--as", "vain")
    assert "look at me" in applied.ok("digest", "vain")


def test_the_budget_cuts_the_oldest_and_says_how_many(applied: World) -> None:
    reporter(applied, "busy", "[digest]\nmax_entries = 2\n")
    applied.ok("run", "busy")  # sets its cursor at the (empty) head
    applied.ok("log", "add", "zero", "--as", "scout")
    cursor = applied.json("digest", "busy")["cursor"]
    for word in ("one", "two", "three", "four"):
        applied.ok("log", "add", word, "--as", "scout")
    digest = applied.json("digest", "busy")
    assert [e["summary"] for e in digest["entries"]] == ["four", "three"]
    assert digest["omitted"] == 3
    first_omitted = 0 if cursor is None else cursor + 1
    assert (
        f"3 older entries omitted (yours included) — `covey log --since {first_omitted}`"
        in (digest["text"])
    )
    shown = [e["summary"] for e in log(applied, "--since", str(first_omitted), "--limit", "3")]
    assert shown == ["zero", "one", "two"]  # exactly what the digest left out


def test_max_chars_is_a_hard_budget(applied: World) -> None:
    reporter(applied, "terse", "[digest]\nmax_chars = 300\n")
    applied.ok("run", "terse")
    for n in range(10):
        applied.ok("log", "add", f"entry number {n} with some words", "--as", "scout")
    digest = applied.json("digest", "terse")
    body = digest["text"].split("\n\n")
    assert len("\n\n".join(body[:-1])) <= 300  # the entries; the omitted line follows
    assert 0 < len(digest["entries"]) < 10
    assert digest["omitted"] == 10 - len(digest["entries"])


def test_the_cursor_advances_after_an_ok_run_and_not_after_a_failed_one(applied: World) -> None:
    applied.add_agent("flaky", 'command = "cat $COVEY_DIGEST_FILE; exit ${FAIL:-0}"\n')
    applied.ok("run", "flaky")
    applied.ok("log", "add", "important", "--as", "scout")
    applied.extra_env["FAIL"] = "1"
    failed = applied.covey("run", "flaky")
    assert failed.returncode == 1 and "important" in failed.stdout
    assert "important" in applied.ok("digest", "flaky")  # shown again next time
    applied.extra_env["FAIL"] = "0"
    assert "important" in applied.ok("run", "flaky")
    assert "Nothing new since" in applied.ok("digest", "flaky")


def test_the_cursor_survives_a_supervisor_restart(applied: World) -> None:
    reporter(applied, "steady")
    applied.ok("log", "add", "old news", "--as", "scout")
    for round_ in range(2):
        supervisor = start(applied, "supervise", "--metrics-port", str(free_port()))
        try:
            deadline = time.monotonic() + 30
            while applied.covey("run", "steady", "--via-supervisor").returncode != 0:
                assert time.monotonic() < deadline
                time.sleep(0.3)
            wait_for(lambda n=round_: len(applied.json("runs", "steady")) > n, timeout=30)
            wait_for(lambda: applied.json("runs", "steady")[-1]["outcome"] == "ok", timeout=30)
        finally:
            supervisor.send_signal(signal.SIGTERM)
            assert supervisor.wait(60) == 0
        if round_ == 0:
            applied.ok("log", "add", "fresh news", "--as", "scout")
    digest_after = applied.json("digest", "steady")
    assert digest_after["entries"] == []  # both supervisors' runs moved the cursor
    logs = sorted((applied.state_dir / "runs" / "steady").glob("*.log"))
    second_run = logs[-1].read_text()
    assert "fresh news" in second_run and "old news" not in second_run


def test_the_instructions_file_is_rendered_before_the_agent_starts(applied: World) -> None:
    folder = applied.add_agent("claude", 'command = "cat CLAUDE.md"\ninstructions = "CLAUDE.md"\n')
    (folder / "AGENT.md").write_text("# claude\nYou write the release notes.\n")
    applied.ok("log", "add", "Renamed the API", "--as", "scout", "--body", "v2 is /api/v2")
    out = applied.ok("run", "claude")
    assert "You write the release notes." in out
    assert "Renamed the API" in out and "> v2 is /api/v2" in out
    assert "covey inbox" in out and "covey log add" in out
    assert out.index("You write") < out.index("Renamed the API") < out.index("covey inbox")


def test_the_instructions_name_the_mcp_tools_when_the_agent_has_them(applied: World) -> None:
    folder = applied.add_agent("claude", 'command = "cat CLAUDE.md"\ninstructions = "CLAUDE.md"\n')
    servers = {"mcpServers": {"mail": {"command": "covey", "args": ["mcp"]}}}
    (folder / ".mcp.json").write_text(json.dumps(servers))
    out = applied.ok("run", "claude")
    assert "Your covey MCP tools: `inbox`" in out and "covey inbox" not in out
    (folder / ".mcp.json").write_text(json.dumps({"mcpServers": {"x": {"command": "other"}}}))
    assert "covey inbox" in applied.ok("run", "claude")


def test_the_digest_can_come_on_stdin(applied: World) -> None:
    applied.add_agent("piped", 'command = "cat"\ninject = "stdin"\n')
    applied.ok("log", "add", "through the pipe", "--as", "scout")
    assert "through the pipe" in applied.ok("run", "piped")


def test_the_claude_hook_output_is_the_documented_json(applied: World) -> None:
    reporter(applied, "interactive")
    applied.ok("log", "add", "for the hook", "--as", "scout")
    hook = json.loads(applied.ok("digest", "interactive", "--format", "claude-hook"))
    assert set(hook) == {"hookSpecificOutput"}
    assert hook["hookSpecificOutput"]["hookEventName"] == "SessionStart"
    assert "for the hook" in hook["hookSpecificOutput"]["additionalContext"]
    # Without --advance it stays; with it, the next session starts after it.
    applied.ok("digest", "interactive", "--format", "claude-hook", "--advance")
    assert "Nothing new since" in applied.ok("digest", "interactive")
