"""The web server's JSON API, over HTTP, from a real `covey web` (and `covey supervise`)
process on a real broker: every endpoint answers with what the CLI shows; bad input and
unknown ids are JSON errors with a 4xx status, never a 500."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import World, start

from coordinator.localbroker import free_port


@contextlib.contextmanager
def serving(world: World, *args: str, port: int | None = None) -> Iterator[httpx.Client]:
    """`covey web` (or ARGS, e.g. supervise) on `port` (a free one by default); an HTTP
    client for it. Stopped, and checked to exit 0, when the block ends, unless the test
    stopped it itself (with `client.process`)."""
    port = port or free_port()
    command = args or ("web",)
    flag = "--port" if command[0] == "web" else "--metrics-port"
    process = start(world, *command, flag, str(port), stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/api/openapi.json", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "the server never answered"
                time.sleep(0.1)
        with httpx.Client(base_url=base, timeout=30) as client:
            client.process = process  # type: ignore[attr-defined]  # to signal it
            yield client
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            _, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert process.returncode == 0, err


@pytest.fixture
def web(applied: World) -> Iterator[httpx.Client]:
    with serving(applied) as client:
        yield client


def ok(client: httpx.Client, path: str, **params: Any) -> Any:
    answer = client.get(path, params=params)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    return answer.json()


def test_agents_locks_runs_and_sessions_say_what_the_cli_says(applied: World) -> None:
    with serving(applied) as web:
        applied.add_agent("quick", 'command = "echo hello"\n')
        assert {a["name"] for a in ok(web, "/api/agents")} == {"scout", "writer", "loner"}
        # SIGHUP reads the roster again, as it does for the supervisor.
        web.process.send_signal(signal.SIGHUP)  # type: ignore[attr-defined]
        wait = time.monotonic() + 10
        while len(ok(web, "/api/agents")) < 4:
            assert time.monotonic() < wait, "SIGHUP did not reload the roster"
            time.sleep(0.1)
        _runs_say_what_the_cli_says(applied, web)


def _runs_say_what_the_cli_says(applied: World, web: httpx.Client) -> None:
    applied.ok("send", "scout", "a question")
    assert applied.covey("run", "quick").returncode == 0
    agents = {a["name"]: a for a in ok(web, "/api/agents")}
    assert set(agents) == {"scout", "writer", "loner", "quick"}
    assert agents["scout"]["pending"] == 1 and agents["scout"]["state"] == "idle"
    assert agents["quick"]["last_run"]["outcome"] == "ok"
    assert agents["quick"]["lock"] == "global"
    (lock,) = ok(web, "/api/locks")
    assert lock == {"name": "global", "slots": 1, "holders": []}
    (record,) = ok(web, "/api/runs", agent="quick")
    assert record == applied.json("runs", "quick")[-1] | {
        k: record[k] for k in ("started_at", "finished_at")
    }
    assert ok(web, f"/api/runs/{record['run_id']}") == record
    assert ok(web, "/api/runs", outcome="failed") == []
    assert [s["run_id"] for s in ok(web, "/api/sessions")] == [record["run_id"]]


def test_changelog_and_dead_letters(applied: World, web: httpx.Client) -> None:
    for n in range(3):
        applied.ok("log", "add", f"change {n}", "--as", "scout")
    entries = ok(web, "/api/changelog")
    assert [e["summary"] for e in entries] == ["change 0", "change 1", "change 2"]
    assert all(e["author"] == "agent:scout" and e["verified"] for e in entries)
    since = ok(web, "/api/changelog", since=entries[1]["offset"], limit=1)
    assert [e["summary"] for e in since] == ["change 1"]
    assert ok(web, "/api/dead") == []
    applied.covey("send", "agent:nobody", "lost")  # kept in covey.unrouted
    (letter,) = ok(web, "/api/dead")
    assert letter["reason"] == "unroutable"
    assert ok(web, f"/api/dead/{letter['id'][:8]}")["id"] == letter["id"]


@pytest.mark.parametrize(
    ("path", "status", "words"),
    [
        ("/api/runs/20990101T000000-ffffff", 404, "no run"),
        ("/api/dead/abcdef12", 404, "no dead letter"),
        ("/api/dead/ab", 400, "too short"),
        ("/api/runs?limit=0", 400, "limit"),
        ("/api/runs?limit=many", 400, "limit"),
        ("/api/runs?limit=1&limit=2", 400, "once"),
        ("/api/runs?agent=nobody", 404, "no agent 'nobody'"),
        ("/api/changelog?since=0.5", 400, "since"),
        ("/api/runs?colour=red", 400, "colour"),
        ("/api/changelog?since=yesterday-ish", 400, "since"),
        ("/api/nothing-here", 404, "no such path"),
    ],
)
def test_bad_input_is_a_json_error_with_a_4xx_status(
    web: httpx.Client, path: str, status: int, words: str
) -> None:
    answer = web.get(path)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["status"] == status and words in body["error"], body


def test_a_post_on_a_read_only_path_is_405(web: httpx.Client) -> None:
    answer = web.post("/api/agents")
    assert answer.status_code == 405 and "not allowed" in answer.json()["error"]
    assert answer.headers["allow"] == "GET, HEAD"  # RFC 9110: which methods it takes


def test_the_openapi_document_names_every_path_and_its_models(web: httpx.Client) -> None:
    document = ok(web, "/api/openapi.json")
    assert document["openapi"].startswith("3.")
    assert {"/api/agents", "/api/runs", "/api/runs/{run_id}", "/api/dead/{letter_id}"} <= set(
        document["paths"]
    )
    schemas = document["components"]["schemas"]
    assert {"AgentView", "RunView", "ErrorView", "DeadLetterView"} <= set(schemas)


def test_every_answer_carries_the_security_headers(web: httpx.Client) -> None:
    for path in ("/", "/api/agents", "/api/nothing-here"):
        headers = web.get(path).headers
        policy = headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
        assert headers["x-content-type-options"] == "nosniff"


def test_the_supervisor_serves_the_page_the_api_and_metrics_on_one_port(applied: World) -> None:
    with serving(applied, "supervise") as client:
        assert "covey_up 1.0" in client.get("/metrics").text
        assert {a["name"] for a in ok(client, "/api/agents")} == {"scout", "writer", "loner"}
        page = client.get("/")
        assert page.status_code == 200 and "<title>covey</title>" in page.text


def test_a_busy_port_is_one_line_and_exit_2(applied: World) -> None:
    with serving(applied) as client:
        port = str(client.base_url.port)
        result = applied.covey("web", "--port", port, timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "pick another --port" in result.stderr


def test_schemathesis_finds_no_5xx_and_no_schema_violation(applied: World, tmp_path: Path) -> None:
    """Schemathesis, from the OpenAPI document alone, against a real `covey web`: every
    check (server errors, response schemas, status codes, headers, methods) on every
    operation but the two event streams, which end only with their run or never."""
    applied.add_agent("quick", 'command = "echo hello"\n')
    assert applied.covey("run", "quick").returncode == 0
    applied.ok("log", "add", "a change", "--as", "scout")
    with serving(applied) as web:
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "st"),
                "run",
                f"{web.base_url}/api/openapi.json",
                "--checks",
                "all",
                "--exclude-path-regex",
                "events$",
                "--max-examples",
                "25",
                "--request-timeout",
                "30",
                "--seed",
                "14",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,  # its cache (.schemathesis/) goes there, not into the checkout
        )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
