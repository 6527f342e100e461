"""The web page in a real browser: Debian's chromium driven by Playwright, against a real
`covey web` and real `covey run`s on a real broker.

Every test's browser context records what the page asks for and what it does: every
request must go to the server under test (nothing from the internet, users run this
behind firewalls), no dialog may open (agent output that ran as code would open one),
and the console must show no Content-Security-Policy violation (an inline style or
script of the page's own would). Line latencies are measured in the page itself: a
MutationObserver, installed before the page's own script runs, notes when each output
line was added, against the time the agent printed in that line.
"""

from __future__ import annotations

import contextlib
import json
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import REPO, World, start
from test_attach import Output
from test_web_api import serving

from coordinator.localbroker import free_port

playwright_api = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import (  # noqa: E402  (after the skip above)
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Page,
    Request,
    sync_playwright,
)

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = REPO / "docs" / "web-page.png"
SCREENSHOT_MAX_BYTES = 200 * 1024
VIEWPORT = {"width": 1200, "height": 800}

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="no /usr/bin/chromium: tests/run installs it (apt-get)"
)

# An agent that prints a numbered line with the time it printed it every 0.3 s, and says
# what it does in between: progress, a tool call, a status, a few tokens (the run page
# shows each its own way). Arguments: how many lines, then extra lines to print first.
TICKER_SCRIPT = """\
import sys, time
from coordinator.emit import emit_blocking

count = int(sys.argv[1])
for extra in sys.argv[2:]:
    print(extra, flush=True)
for i in range(1, count + 1):
    if i % 10 == 1:
        emit_blocking("status", f"batch {i // 10 + 1} of {(count + 9) // 10}")
    print(f"tick {i} at {time.time():.3f}", flush=True)
    if i % 4 == 0:
        emit_blocking("progress", f"{i} of {count} ticks", {"fraction": i / count})
    if i % 10 == 3:
        emit_blocking("tool", f"read_file notes/{i}.md")
    if i % 10 == 6:
        for word in ["thinking ", "about ", f"tick {i}"]:
            emit_blocking("token", word)
    time.sleep(0.3)
emit_blocking("result", f"{count} ticks printed")
"""

# Notes when each output line (an element with the class `line`) enters the document.
OBSERVER = """
window.__lines = [];
new MutationObserver((records) => {
  const at = Date.now() / 1000;
  for (const record of records) {
    for (const node of record.addedNodes) {
      if (node.nodeType === 1 && node.classList.contains("line")) {
        window.__lines.push([node.dataset.id, node.textContent, at]);
      }
    }
  }
}).observe(document, { childList: true, subtree: true });
"""


TICKS = 40  # the ticker's: 12 s of output
HOSTILE = ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>", "\x1b[31mred\x1b[0m"]


def add_ticker(world: World, name: str, count: int, *first: str) -> None:
    """An agent running TICKER_SCRIPT: `count` ticks, after the lines `first`."""
    folder = world.add_agent(
        name,
        # JSON strings are TOML strings: the escape character goes in as \u001b.
        f'command = {json.dumps(["./agent.py", str(count), *first])}\ngrace = "2s"\n',
    )
    # This venv's Python by a shebang: as a command's first word, the runner would
    # resolve its symlink to the system's Python, which lacks covey.
    script = folder / "agent.py"
    script.write_text(f"#!{sys.executable} -u\n{TICKER_SCRIPT}")
    script.chmod(0o755)


@dataclass
class Watched:
    """A browser context and what its pages did: requests, dialogs, console errors."""

    context: BrowserContext
    base: str
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def page(self) -> Page:
        page = self.context.new_page()
        page.on("console", self._console)
        page.on("pageerror", lambda err: self.problems.append(f"page error: {err}"))
        return page

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            self.problems.append(message.text)

    def _request(self, request: Request) -> None:
        self.requests.append(request.url)

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def check(self) -> None:
        elsewhere = [url for url in self.requests if urlsplit(url).hostname != "127.0.0.1"]
        assert elsewhere == [], f"the page asked another origin: {elsewhere}"
        assert self.dialogs == [], f"a dialog opened: {self.dialogs}"
        assert self.problems == [], self.problems


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def web(applied: World) -> Iterator[httpx.Client]:
    add_ticker(applied, "ticker", TICKS)
    add_ticker(applied, "hostile", 3, *HOSTILE)
    with serving(applied) as client:
        yield client


@contextlib.contextmanager
def watching(browser: Browser, server: httpx.Client) -> Iterator[Watched]:
    """A fresh browser context on `server`, checked when the block ends."""
    context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    seen = Watched(context, str(server.base_url).rstrip("/"))
    context.on("request", seen._request)
    context.on("dialog", seen._dialog)
    context.add_init_script(OBSERVER)
    try:
        yield seen
        seen.check()
        assert len(seen.requests) > 3, seen.requests  # the watching itself worked
    finally:
        context.close()


@pytest.fixture
def watched(browser: Browser, web: httpx.Client) -> Iterator[Watched]:
    with watching(browser, web) as seen:
        yield seen


def agent_names(page: Page) -> list[str]:
    page.wait_for_selector("#agents tbody tr[data-agent]")
    return page.eval_on_selector_all(
        "#agents tbody tr[data-agent]", "rows => rows.map(r => r.dataset.agent)"
    )


def shown_lines(page: Page) -> list[tuple[str, str, float]]:
    """(id, text, when added) of each output line the page added, in the order it did."""
    return [tuple(x) for x in page.evaluate("window.__lines")]  # type: ignore[misc]


def lines_on_page(page: Page) -> list[str]:
    return page.eval_on_selector_all("#output .ev.line", "rows => rows.map(r => r.textContent)")


def ticks(texts: list[str]) -> list[int]:
    return [int(text.split()[1]) for text in texts if text.startswith("tick ")]


def wait_ended(page: Page, timeout: float = 60.0) -> None:
    page.wait_for_selector("#run-end:not([hidden])", timeout=timeout * 1000)


# -- the overview ---------------------------------------------------------------------------


def test_the_overview_lists_the_roster_under_a_strict_policy(watched: Watched) -> None:
    page = watched.page()
    answer = page.goto(watched.base + "/")
    assert answer is not None and answer.status == 200
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert sorted(agent_names(page)) == ["hostile", "loner", "scout", "ticker", "writer"]
    for table in ("#locks", "#runs", "#dead"):
        page.wait_for_selector(f"{table} tbody tr")
    assert page.inner_text("#runs tbody") == "no runs yet"
    assert page.inner_text("#locks tbody").startswith("global")
    # Read-only without a token: no action anywhere, a sign-in form instead.
    assert page.is_visible("#sign-in")
    assert page.locator("button.run-now, button.stop").count() == 0
    assert page.is_hidden("#mail-box")
    # A run nobody knows: its page says so, in the API's words.
    page.goto(watched.base + "/#/runs/20990101T000000-ffffff")
    page.wait_for_selector("#output .notice")
    assert "no run" in page.inner_text("#output .notice").lower()


def test_a_run_shows_live_on_the_overview_and_its_page_each_line_once(
    applied: World, web: httpx.Client, watched: Watched
) -> None:
    overview = watched.page()
    overview.goto(watched.base + "/")
    agent_names(overview)
    overview.evaluate("window.__notReloaded = true")
    run = Output(start(applied, "run", "ticker"))
    try:
        # Appears on the overview, with no reload, within 2 s of its start.
        overview.wait_for_selector("#runs tbody tr[data-run]", timeout=30_000)
        seen_at = time.time()
        run_id = overview.get_attribute("#runs tbody tr[data-run]", "data-run")
        assert run_id is not None
        assert overview.evaluate("window.__notReloaded") is True
        started = _started_at(web, run_id)
        shown_after = seen_at - started
        assert shown_after < 2.0, f"shown {shown_after:.2f} s after it started"
        overview.wait_for_selector('#agents tr[data-agent="ticker"] a.watch')

        # Its page, from the overview's link: lines within a second of their printing.
        overview.click('#agents tr[data-agent="ticker"] a.watch')
        overview.wait_for_selector("#output .ev.line")
        assert overview.url.endswith(f"#/runs/{run_id}")
        _wait_for_tick(overview, 8)
        latencies = _latencies(shown_lines(overview))

        # A reload mid-run: every line again, from the start, each once.
        overview.reload()
        _wait_for_tick(overview, 14)
        # A second tab opened mid-run, from the address alone.
        second = watched.page()
        second.goto(f"{watched.base}/#/runs/{run_id}")
        _wait_for_tick(second, 20)
        second.wait_for_selector("#run-progress:not([hidden])")
        SCREENSHOT.parent.mkdir(exist_ok=True)
        second.screenshot(path=str(SCREENSHOT))
        assert run.finish(60) == 0
        for page in (overview, second):
            wait_ended(page)
            texts = lines_on_page(page)
            assert ticks(texts) == list(range(1, TICKS + 1)), texts
            ids = [int(id_) for id_, _, _ in shown_lines(page)]
            assert ids == sorted(set(ids)), "a line was added twice, or out of order"
            assert "ok" in page.inner_text("#run-end")
            latencies += _latencies(shown_lines(page))
        # `end` closed the stream: the browser does not reconnect to the finished run.
        asked = _session_requests(watched, run_id)
        time.sleep(4)  # EventSource's own retry is 3 s
        assert _session_requests(watched, run_id) == asked
    finally:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()
    print(
        f"on the overview {shown_after:.2f} s after its start; line latency over"
        f" {len(latencies)} lines: median {statistics.median(latencies):.3f} s,"
        f" max {max(latencies):.3f} s; slowest {sorted(latencies)[-4:]}"
    )
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
    assert SCREENSHOT.stat().st_size <= SCREENSHOT_MAX_BYTES


def _started_at(web: httpx.Client, run_id: str) -> float:
    record = web.get(f"/api/runs/{run_id}").json()
    return datetime.fromisoformat(record["started_at"]).timestamp()


def _wait_for_tick(page: Page, n: int, timeout: float = 30.0) -> None:
    page.wait_for_function(
        """n => [...document.querySelectorAll('#output .ev.line')]
                 .some(e => e.textContent.startsWith('tick ' + n + ' '))""",
        arg=n,
        timeout=timeout * 1000,
    )


def _latencies(shown: list[tuple[str, str, float]]) -> list[float]:
    """How long after its printing each line printed while the page watched was added.
    Lines printed before the page loaded came in its replay: they are left out, as
    are those of the first half second (the page was still catching up)."""
    if not shown:
        return []
    watching_since = shown[0][2] + 0.5
    found = []
    for _, text, added in shown:
        words = text.split()
        if len(words) == 4 and words[0] == "tick" and words[2] == "at":
            printed = float(words[3])
            if printed >= watching_since:
                found.append(round(added - printed, 3))
    return found


def _session_requests(watched: Watched, run_id: str) -> int:
    return sum(1 for url in watched.requests if f"/api/sessions/{run_id}/events" in url)


def test_a_dropped_connection_resumes_by_itself_with_each_line_once(
    applied: World, browser: Browser
) -> None:
    add_ticker(applied, "ticker", TICKS)
    port = free_port()
    first = serving(applied, port=port)
    run = Output(start(applied, "run", "ticker"))
    try:
        with first as server, watching(browser, server) as watched:
            session_asks: list[Request] = []
            watched.context.on(
                "request", lambda r: session_asks.append(r) if "/sessions/" in r.url else None
            )
            page = watched.page()
            run.wait_for(lambda text: text.startswith("tick "))
            (record,) = server.get("/api/runs", params={"agent": "ticker"}).json()
            page.goto(f"{watched.base}/#/runs/{record['run_id']}")
            _wait_for_tick(page, 5)
            # The server goes away mid-run and comes back on the same port: the page's
            # EventSource reconnects by itself, sending the last id it saw.
            server.process.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
            server.process.wait(30)  # type: ignore[attr-defined]
            page.wait_for_selector(".following:has-text('connecting')")
            time.sleep(1)
            with serving(applied, port=port):
                assert run.finish(60) == 0
                wait_ended(page, timeout=30)
                texts = lines_on_page(page)
                assert ticks(texts) == list(range(1, TICKS + 1)), texts
                ids = [int(id_) for id_, _, _ in shown_lines(page)]
                assert ids == sorted(set(ids))
                # From the start first; last (after tries the absent server refused),
                # after the last id it had seen: at least tick 5's.
                last_ids = [r.all_headers().get("last-event-id") for r in session_asks]
                assert last_ids[0] is None and len(last_ids) >= 2, last_ids
                assert int(last_ids[-1] or -1) >= ids[4], (last_ids, ids)
    finally:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


def test_a_long_run_shows_its_newest_entries_and_says_how_many_left(
    applied: World, browser: Browser
) -> None:
    applied.add_agent("many", 'command = "seq 12000"\n')
    applied.ok("run", "many")
    with serving(applied) as server, watching(browser, server) as watched:
        (record,) = server.get("/api/runs").json()
        page = watched.page()
        asked = time.monotonic()
        page.goto(f"{watched.base}/#/runs/{record['run_id']}")
        wait_ended(page)
        page.wait_for_selector("#output .ev.closed")
        took = time.monotonic() - asked
        texts = lines_on_page(page)
        # 12,002 entries (opened, the lines, closed): the newest 10,000 stay, the first 2,002 go.
        assert texts == [str(n) for n in range(2002, 12001)], (texts[:2], texts[-2:])
        assert page.inner_text("#run-dropped").startswith("2002 earlier entries")
        top, height, seen = page.eval_on_selector(
            "#output", "box => [box.scrollTop, box.scrollHeight, box.clientHeight]"
        )
        assert height - top - seen < 40, "the output does not show its end"
    print(f"12,000 lines replayed in {took:.1f} s")


# -- agent output is data -------------------------------------------------------------------


def test_markup_and_escape_sequences_from_an_agent_show_as_text(
    applied: World, web: httpx.Client, watched: Watched
) -> None:
    run = Output(start(applied, "run", "hostile"))
    assert run.finish(60) == 0
    (record,) = web.get("/api/runs", params={"agent": "hostile"}).json()
    page = watched.page()
    page.goto(f"{watched.base}/#/runs/{record['run_id']}")
    wait_ended(page)
    texts = lines_on_page(page)
    assert texts[:3] == [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(2)>",
        "\\x1b[31mred\\x1b[0m",  # the escape made visible, as `covey attach` shows it
    ]
    assert ticks(texts) == [1, 2, 3]
    for text in ("<script>alert(1)</script>", "\\x1b[31mred"):
        assert page.get_by_text(text, exact=False).first.is_visible()
    # Text, not markup: the output holds no element the agent's words would have made.
    assert page.locator("#output script, #output img").count() == 0
    # The overview shows the same run with its outcome, as text too.
    page.goto(watched.base + "/")
    page.wait_for_selector(f'#runs tr[data-run="{record["run_id"]}"]')
    assert "ok" in page.inner_text(f'#runs tr[data-run="{record["run_id"]}"]')


# -- actions, for a person signed in ----------------------------------------------------------


def test_a_signed_in_person_runs_stops_and_mails_and_nobody_else_can(
    applied: World, browser: Browser
) -> None:
    add_ticker(applied, "ticker", TICKS)
    # The supervisor serves the page here: "run now" asks it for a run.
    with serving(applied, "supervise") as server, watching(browser, server) as watched:
        if server.get("/api/session").status_code == 404:
            pytest.skip("no /api/session in this build: the actions are not merged yet")
        page = watched.page()
        page.goto(watched.base + "/")
        agent_names(page)
        assert page.locator("button.run-now").count() == 0  # read-only until signed in
        page.fill("#token", "not-a-token")
        page.click("#sign-in button")
        page.wait_for_selector("#flash.bad")
        assert page.is_hidden("#signed-in")

        token = applied.ok("web", "token", "ada").strip()
        page.fill("#token", token)
        page.click("#sign-in button")
        page.wait_for_selector("#signed-in:not([hidden])")
        assert page.inner_text("#person") == "human:ada"
        assert page.input_value("#token") == ""  # not left in the form

        page.click('#agents tr[data-agent="ticker"] button.run-now')
        page.wait_for_selector('#agents tr[data-agent="ticker"] a.watch', timeout=30_000)
        page.click('#agents tr[data-agent="ticker"] a.watch')
        _wait_for_tick(page, 2)
        run_id = page.url.rsplit("/", 1)[1]
        # Without the cookie, the same request is refused.
        refused = server.post(f"/api/runs/{run_id}/stop", json={})
        assert refused.status_code == 401, refused.text
        page.click("#run-stop")
        wait_ended(page)
        assert "stopped" in page.inner_text("#run-end")
        # The session's `closed` comes just before the run's record of its end.
        deadline = time.monotonic() + 15
        while (record := server.get(f"/api/runs/{run_id}").json())["outcome"] != "stopped":
            assert time.monotonic() < deadline, record
            time.sleep(0.2)
        assert record["stopped_by"] == "human:ada"
        assert len(ticks(lines_on_page(page))) < TICKS

        page.goto(watched.base + "/")
        page.fill("#mail-to", "agent:scout")
        page.fill("#mail-subject", "from the page")
        page.fill("#mail-body", "<b>as text</b>")
        page.click("#mail button")
        page.wait_for_selector("#flash:has-text('mail sent')")
        page.wait_for_selector('#agents tr[data-agent="scout"] td.num:has-text("1")')
        page.click("#sign-out")
        page.wait_for_selector("#sign-in:not([hidden])")
        assert page.locator("button.run-now").count() == 0
    inbox = applied.ok("inbox", "--as", "scout")
    assert "from the page" in inbox and "human:ada" in inbox
