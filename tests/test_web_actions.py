"""The web app's actions (stop a run, request a run, send mail) over HTTP, from a real
`covey web` process on a real broker, with real runs and a real `covey supervise`: only a
person with a web token may act, by bearer token or by the session cookie with its CSRF
token, from the page's own origin; the read-only API stays open. In a provisioned
namespace each action is the person's own broker user's, so the broker still decides."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import time
from typing import Any

import httpx
from conftest import Broker, World, start
from test_security import as_user, secured, user_named
from test_stop import TICKER, ended, finish, last_run, start_run
from test_web_api import serving

from coordinator.provision import Management

__all__ = ["secured"]  # the fixture, used here by name

# Beyond the server's own wait for a stopped run (its grace plus 30 s), so that a slow
# stop on a loaded machine answers with the server's words rather than a client timeout.
STOP_WAIT = 90.0


def token_for(world: World, name: str = "ada") -> str:
    printed = world.covey("web", "token", name)
    assert printed.returncode == 0, printed.stderr
    (token,) = printed.stdout.split()  # the token alone on stdout
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def fresh(web: httpx.Client) -> httpx.Client:
    """Another client of the same server, with no cookies."""
    return httpx.Client(base_url=web.base_url, timeout=60)


def sign_in(web: httpx.Client, token: str) -> dict[str, str]:
    """Sign `web` in with the cookie; the headers its actions then need (CSRF)."""
    answer = web.post("/api/session", json={"token": token})
    assert answer.status_code == 200, answer.text
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert "secure" not in cookie  # plain http on loopback: a Secure cookie would not return
    return {"X-CSRF-Token": answer.json()["csrf"]}


def refused(answer: httpx.Response, status: int, words: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["status"] == status and words in body["error"], body


def inbox(world: World, who: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    mails: list[dict[str, Any]] = json.loads(
        world.ok("inbox", "--as", who, "--json", env=env or world.env)
    )
    return mails


# -- tokens -------------------------------------------------------------------------------


def test_a_token_is_printed_once_and_only_its_hash_is_kept(applied: World) -> None:
    first = token_for(applied)
    path = applied.state_dir / "web-tokens.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first not in path.read_text()
    (entry,) = json.loads(path.read_text())["tokens"].items()
    assert entry[0] == "human:ada" and len(entry[1]["sha256"]) == 64
    with serving(applied) as web:
        assert web.get("/api/session", headers=bearer(first)).json()["person"] == "human:ada"
        # Again: a new token, and the old one no longer works (without a restart).
        second = token_for(applied, "human:ada")
        assert second != first and second not in path.read_text()
        refused(web.get("/api/session", headers=bearer(first)), 401, "not a valid web token")
        assert web.get("/api/session", headers=bearer(second)).status_code == 200
        assert applied.ok("web", "token", "ada", "--revoke").startswith("Revoked human:ada")
        refused(web.get("/api/session", headers=bearer(second)), 401, "not a valid web token")
    # Only people in the roster get one.
    for name, words in (("bob", "not in the roster"), ("agent:scout", "not a person")):
        result = applied.covey("web", "token", name)
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert result.stdout == ""


# -- what is refused ------------------------------------------------------------------------


def test_actions_are_refused_without_a_person_or_from_elsewhere(applied: World) -> None:
    token = token_for(applied)
    with serving(applied) as web:
        port = web.base_url.port
        mail = {"to": "scout", "subject": "hello"}

        def send(body: Any = mail, **headers: str) -> httpx.Response:
            return web.post("/api/mail", json=body, headers=headers)

        # Read-only needs nobody.
        assert web.get("/api/agents").status_code == 200
        refused(web.get("/api/session"), 401, "sign in first")
        # No token, a wrong one, a malformed header.
        refused(send(), 401, "sign in first")
        refused(send(**bearer("covey_wrong")), 401, "not a valid web token")
        refused(send(Authorization=token), 401, "Bearer")
        refused(web.post("/api/session", json={"token": "covey_wrong"}), 401, "not a valid")
        # GET on an action path: 405, not the page's 404.
        for path in ("/api/mail", "/api/agents/scout/run", "/api/runs/x/stop", "/api/session/end"):
            refused(web.get(path, headers=bearer(token)), 405, "GET is not allowed")
        # Another origin, even with a valid token.
        for origin in ("http://evil.example", f"http://127.0.0.1:{port + 1}", "null"):
            refused(send(**bearer(token), Origin=origin), 403, "another origin")
            signing_in = web.post("/api/session", json={"token": token}, headers={"Origin": origin})
            refused(signing_in, 403, "another origin")
        refused(send(**bearer(token), **{"Sec-Fetch-Site": "cross-site"}), 403, "cross-site")
        # Bad input is a 4xx naming the problem.
        refused(send({"to": "scout"}, **bearer(token)), 400, "subject")
        refused(send({**mail, "cc": "x"}, **bearer(token)), 400, "cc")
        refused(send({**mail, "to": "agent:"}, **bearer(token)), 400, "name")
        broken = {**bearer(token), "Content-Type": "application/json"}
        refused(web.post("/api/mail", content=b"{", headers=broken), 400, "JSON")
        refused(web.post("/api/mail", data=mail, headers=bearer(token)), 415, "JSON")
        # The cookie alone is not enough: it needs its CSRF token, the right one.
        csrf = sign_in(web, token)
        session = web.get("/api/session").json()
        assert session == {"person": "human:ada", "csrf": csrf["X-CSRF-Token"]}
        refused(send(), 403, "X-CSRF-Token")
        refused(send(**{"X-CSRF-Token": "0" * 64}), 403, "X-CSRF-Token")
        refused(send(**csrf, Origin="http://evil.example"), 403, "another origin")
        # Over https (here: as a TLS proxy on loopback says), the cookie is Secure too.
        with fresh(web) as proxied:
            answer = proxied.post(
                "/api/session", json={"token": token}, headers={"X-Forwarded-Proto": "https"}
            )
            assert answer.status_code == 200 and "; secure" in answer.headers["set-cookie"].lower()
        # Signed out, the cookie is gone.
        assert web.post("/api/session/end").status_code == 204
        refused(web.get("/api/session"), 401, "sign in first")
    assert inbox(applied, "scout") == []  # nothing refused got through


# -- the actions ----------------------------------------------------------------------------


def test_mail_is_sent_as_the_person_by_token_and_by_cookie(applied: World) -> None:
    token = token_for(applied)
    with serving(applied) as web:
        port = web.base_url.port
        with fresh(web) as script:
            letter = {"to": "scout", "subject": "by token", "body": "one"}
            sent = script.post("/api/mail", headers=bearer(token), json=letter)
        assert sent.status_code == 200, sent.text
        csrf = sign_in(web, token)
        page = {**csrf, "Origin": f"http://127.0.0.1:{port}"}  # as a browser sends it
        by_cookie = web.post("/api/mail", headers=page,
                             json={"to": "team:research", "subject": "by cookie"})  # fmt: skip
        assert by_cookie.status_code == 200, by_cookie.text
        unknown = web.post("/api/mail", headers=page, json={"to": "nobody", "subject": "lost"})
        refused(unknown, 404, "roster")
    mails = inbox(applied, "scout")
    assert [(m["sender"], m["subject"]) for m in mails] == [
        ("human:ada", "by token"),
        ("human:ada", "by cookie"),
    ]
    assert mails[0]["id"] == sent.json()["id"]
    assert [m["subject"] for m in inbox(applied, "writer")] == ["by cookie"]


def test_a_run_is_stopped_by_the_person_by_token_and_by_cookie(applied: World) -> None:
    applied.add_agent("ticker", TICKER)
    token = token_for(applied)
    with serving(applied) as web:
        csrf = sign_in(web, token)
        for how in ("token", "cookie"):
            run = start_run(applied, "ticker")
            try:
                run_id = last_run(applied, "ticker")["run_id"]
                if how == "token":
                    with fresh(web) as script:
                        answer = script.post(
                            f"/api/runs/{run_id}/stop", headers=bearer(token), timeout=STOP_WAIT
                        )
                else:
                    answer = web.post(
                        f"/api/runs/{run_id}/stop",
                        headers=csrf,
                        json={"reason": "from the page"},
                        timeout=STOP_WAIT,
                    )
                assert answer.status_code == 200, answer.text
                finished = answer.json()
                assert finished["kind"] == "run.finished" and finished["run_id"] == run_id
                assert finished["outcome"] == "stopped"
                assert finished["stopped_by"] == "human:ada"
                assert finish(run) == 1
            finally:
                ended(run)
            record = last_run(applied, "ticker")
            assert record["outcome"] == "stopped" and record["stopped_by"] == "human:ada"
        assert record["reason"] == "stopped by human:ada: from the page"
        # Nothing to stop any more: 409, saying so; an unknown run: 404.
        refused(web.post(f"/api/runs/{run_id}/stop", headers=csrf), 409, "nothing to stop")
        refused(web.post("/api/runs/20990101T000000-ffffff/stop", headers=csrf), 404, "no run")


def test_a_run_request_reaches_a_real_supervisor(applied: World) -> None:
    applied.add_agent("quick", 'command = "echo asked"\n')
    token = token_for(applied)
    with serving(applied) as web:
        asked = web.post("/api/agents/quick/run", headers=bearer(token))
        refused(asked, 409, "no supervisor is listening")
        refused(web.post("/api/agents/nobody/run", headers=bearer(token)), 404, "nobody")
        supervisor = start(applied, "supervise", "--no-metrics", stdout=subprocess.DEVNULL)
        try:
            # The supervisor listens for requests a moment after it starts.
            deadline = time.monotonic() + 30
            while (
                asked := web.post("/api/agents/quick/run", headers=bearer(token))
            ).status_code == 409:
                assert time.monotonic() < deadline, asked.text
                time.sleep(0.2)
            assert asked.status_code == 202, asked.text
            assert asked.json() == {"agent": "quick", "requested_by": "human:ada"}
            _wait_for_runs(applied, "quick", 1)
            csrf = sign_in(web, token)
            assert web.post("/api/agents/quick/run", headers=csrf).status_code == 202
            _wait_for_runs(applied, "quick", 2)
        finally:
            supervisor.send_signal(signal.SIGTERM)
            supervisor.communicate(timeout=60)
    runs = applied.json("runs", "quick")
    assert [(r["trigger"], r["outcome"]) for r in runs] == [("request", "ok")] * 2


def _wait_for_runs(world: World, agent: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while len([r for r in world.json("runs", agent) if r["outcome"] != "running"]) < count:
        assert time.monotonic() < deadline, world.json("runs", agent)
        time.sleep(0.2)


# -- provisioned: the person's own broker user acts ----------------------------------------


def test_in_a_provisioned_namespace_the_person_acts_as_their_own_broker_user(
    secured: World, broker: Broker, vhost: str
) -> None:
    world = secured
    world.add_agent("ticker", TICKER)
    with (world.home / "covey.toml").open("a") as config:
        config.write("\n[humans.bob]\n")
    world.ok("provision", "--host", "testhost")  # ticker and bob joined the roster
    # bob may not publish control events at all (no run requests, no stops); mail he may.
    assert isinstance(broker.admin.api, Management)
    bob = user_named(world, "human.bob")
    broker.admin.api.call(
        "PUT",
        f"topic-permissions/{vhost}/{bob}",
        {"exchange": "covey.events", "write": "^$", "read": ".*"},
    )
    ada_token, bob_token = token_for(world, "ada"), token_for(world, "bob")
    # The server itself runs as the operator's user (guest), which is neither of them.
    with serving(world) as web:
        sent = web.post("/api/mail", headers=bearer(ada_token),
                        json={"to": "scout", "subject": "signed by ada"})  # fmt: skip
        assert sent.status_code == 200, sent.text
        # scout, reading with its own credentials, files it: signed by ada's own user. (Mail
        # signed by the server's user would be dead-lettered as spoofed: trust_local is off.)
        mails = inbox(world, "scout", as_user(world, "agent.scout"))
        assert [(m["sender"], m["subject"]) for m in mails] == [("human:ada", "signed by ada")]
        assert web.get("/api/dead").json() == []
        # The broker refuses bob's run request, and says so.
        refused(web.post("/api/agents/ticker/run", headers=bearer(bob_token)), 403, "refused")
        # ada stops a run: the run hears it from her user, so names her.
        run = start_run(world, "ticker")
        try:
            run_id = last_run(world, "ticker")["run_id"]
            refused(web.post(f"/api/runs/{run_id}/stop", headers=bearer(bob_token)), 403, "refused")
            time.sleep(1.0)
            assert run.process.poll() is None
            answer = web.post(
                f"/api/runs/{run_id}/stop", headers=bearer(ada_token), timeout=STOP_WAIT
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["stopped_by"] == "human:ada"
            assert finish(run) == 1
        finally:
            ended(run)
        # bob's mail still goes, as his.
        assert web.post("/api/mail", headers=bearer(bob_token),
                        json={"to": "scout", "subject": "from bob"}).status_code == 200  # fmt: skip
    assert last_run(world, "ticker")["stopped_by"] == "human:ada"
    senders = [m["sender"] for m in inbox(world, "scout", as_user(world, "agent.scout"))]
    assert senders == ["human:ada", "human:bob"]


def test_the_openapi_document_names_the_actions_and_their_bodies(applied: World) -> None:
    with serving(applied) as web:
        document = web.get("/api/openapi.json").json()
    for path in ("/api/mail", "/api/agents/{name}/run", "/api/runs/{run_id}/stop"):
        post = document["paths"][path]["post"]
        assert {"401", "403"} <= set(post["responses"]), path
        assert "get" not in document["paths"][path]
    assert set(document["paths"]["/api/session"]) == {"get", "post", "delete"}
    schemas = document["components"]["schemas"]
    assert {"MailBody", "StopBody", "SessionBody", "SessionView", "Event"} <= set(schemas)
    body = document["paths"]["/api/mail"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/MailBody"
    }
