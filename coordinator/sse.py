"""Server-sent events: the control channel and one session, resumable.

Two streams, both `text/event-stream` (sse-starlette's EventSourceResponse, with a
keep-alive comment every PING_SECONDS so that proxies do not cut an idle stream):

`GET /api/events` is the control channel (`covey.events`: runs requested, started,
stopped and finished, sessions opened and closed, locks acquired and released), each
SSE `event:` the event's kind and its `data:` the event as JSON. It has no ids: it is
a signal to look again, not a record (runs are in /api/runs). One listener serves
every client (`ControlChannel`): one server-named exclusive queue bound to `#`, each
event parsed and encoded once and handed to every client's buffer, so a hundred
open pages cost the broker what one does. A `listening` event says the listener is
bound (from then on nothing is missed); after the connection dropped and was
reopened, `listening` comes again with `"resumed": true`, and what came in between
is lost: a page fetches the state again then. A client that falls CONTROL_BUFFER
events behind is ended with an `error` event, so that its EventSource reconnects
and looks again, rather than miss events silently.

`GET /api/sessions/RUN_ID/events` is one run's session (RUN_ID may also be an agent:
its live run, else its last), read with `session_reader.follow`: each SSE `id:` is
the event's id, `event:` its kind, `data:` the event as JSON with its `id`. Where it
starts: after the `Last-Event-ID` header's id when a client reconnects (strictly
after it: no gap, no repeat), else `?from=start|now|ID` (ID: after that id, as
`covey attach --from`). After the run's `closed` comes one `end` event (`data`:
the run id, the closed event's id and the outcome) and the stream closes. The
page's script closes its EventSource on `end`, so the browser does not reconnect
to a finished run; a client that reconnects anyway with the closed event's id (or
a later one) is answered 204 No Content, which tells an EventSource to stop. An
`expired` event (ids retention removed, made by the reader) carries no SSE `id:`,
since it stands for no stored event: a client that reconnects right after it
resumes where it was and is told again. An unknown run is 404 and a session
retention removed is 410, as JSON, before the stream starts.

One reader per run (`_Hub`): every client following a run from its start, or
resuming within what has been read, is served from one `session_reader.follow` of
that run, kept in memory (its newest HUB_KEPT events) and encoded once; fifty pages
on one run cost the broker one stream consumer, not fifty (fifty consumers of one
stream is what the broker itself cannot keep up with at 1,000 lines a second: see
figure 14). A hub reads on HUB_LINGER_SECONDS after its last client left, so a
reconnect resumes from memory. A client that starts `now`, or resumes before what
the hub kept, gets a reader of its own (`_Pump`). Each client's writes are at least
SEND_SECONDS apart, whatever was read in between in one write. Requests for the same
run at the same moment share one search for where its session starts (`_Hubs.find`).

Streams and disconnects: the session reader consumes `covey.sessions` with a
callback into a queue (never aio-pika's queue iterator: leaving one nacks, and a
stream answers that by closing the whole connection, 540). Readers run in tasks of
their own (a hub's, a pump's), never in the response's generator: when the HTTP
client goes, sse-starlette cancels the response's task group, and anyio keeps
cancelling every await inside it, so a reader cancelled there could not even close
its channel. A reader task is cancelled once, as plain asyncio does, and closes its
channel (which cancels the stream consumer) on the way out; the response waits for
that under a shield.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from aio_pika.abc import AbstractIncomingMessage
from pydantic import Field, ValidationError
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from coordinator import session_reader, stream
from coordinator.errors import BadInput, CoveyError
from coordinator.events import Event
from coordinator.logs import get_logger
from coordinator.session import RUN_HEADER, STREAM, SessionEvent, event_id, offset_of, parse_batch
from coordinator.topology import EVENTS_EXCHANGE
from coordinator.web import Query
from coordinator.web import _query as query_of

if TYPE_CHECKING:
    from coordinator.namespace import Namespace
    from coordinator.session_reader import RunSession, Start

log = get_logger("covey.sse")

PING_SECONDS = 15  # a comment this often keeps proxies from cutting an idle stream
CLOSE_SECONDS = 10.0  # a disconnected client's reader gets this long to close its channel
CONTROL_BUFFER = 1000  # control events a client may fall behind before it is ended
SESSION_BUFFER = 5000  # session events read ahead of a client before its reader waits
SEND_SECONDS = 0.02  # a client's writes are at least this far apart (events batched)
HUB_KEPT = 20_000  # a run's newest events its hub keeps in memory for its clients
HUB_LINGER_SECONDS = 30.0  # a hub with no client left reads on this long
ENDS_REMEMBERED = 10_000  # runs whose closed id this server streamed, for the 204
MAX_ID = 2**63 - 1
SEP = "\n"


def routes(namespace: Namespace) -> list[BaseRoute]:
    """The two event streams over `namespace`."""
    control = ControlChannel(namespace)
    ends = _Ends()
    hubs = _Hubs(namespace)

    async def control_events(request: Request) -> Response:
        query_of(Query, request)  # no parameters: an unknown one is a 400
        return _event_source(_control_stream(control))

    async def session_events(request: Request) -> Response:
        return await _session_response(namespace, hubs, ends, request)

    return [
        Route("/api/events", control_events, methods=["GET"]),
        Route("/api/sessions/{run_id}/events", session_events, methods=["GET"]),
    ]


def _event_source(chunks: AsyncIterator[bytes]) -> EventSourceResponse:
    return EventSourceResponse(chunks, ping=PING_SECONDS, sep=SEP)


# -- the control channel ----------------------------------------------------------------


class _Client:
    """One client of the control channel: its buffer, and whether it fell behind."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(CONTROL_BUFFER)
        self.behind = False

    def put(self, chunk: bytes) -> None:
        try:
            self.queue.put_nowait(chunk)
        except asyncio.QueueFull:
            self.behind = True
            with contextlib.suppress(asyncio.QueueEmpty):  # make room for the news
                self.queue.get_nowait()
            self.queue.put_nowait(b"")


class ControlChannel:
    """One listener on `covey.events` for every client of `/api/events`: started with
    the first client, stopped with the last, listening again on a new connection when
    the one it was on dropped (as stopping.py's listener does)."""

    def __init__(self, namespace: Namespace) -> None:
        self.namespace = namespace
        self.clients: set[_Client] = set()
        self._task: asyncio.Task[None] | None = None
        self._live = False  # bound now: what a new client joins is "listening" at once
        self._resumed = False

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[_Client]:
        client = _Client()
        self.clients.add(client)
        if self._live:
            client.put(_encode_control("listening", {"resumed": False}))
        if self._task is None or self._task.done():
            self._live, self._resumed = False, False
            self._task = asyncio.create_task(self._listen())
        try:
            yield client
        finally:
            self.clients.discard(client)
            if not self.clients and self._task is not None:
                task, self._task, self._live = self._task, None, False
                task.cancel()
                with anyio.move_on_after(CLOSE_SECONDS, shield=True):
                    await asyncio.wait([task])

    def _send(self, chunk: bytes) -> None:
        for client in list(self.clients):
            client.put(chunk)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            event = Event.model_validate_json(message.body)
        except ValidationError:
            return  # not a control event: nothing a page can read
        # Encoded again from what was read, once for every client: only known fields,
        # as JSON, whatever the publisher sent.
        data = event.model_dump_json(exclude_none=True)
        self._send(f"event: {event.kind}{SEP}data: {data}{SEP}{SEP}".encode())

    async def _listen(self) -> None:
        await self.namespace.keep_listening(
            EVENTS_EXCHANGE,
            ["#"],
            self._on_message,
            what="control events",
            on_bound=self._bound,
            on_lost=self._lost,
        )

    def _bound(self) -> None:
        self._live = True
        self._send(_encode_control("listening", {"resumed": self._resumed}))

    def _lost(self) -> None:
        if self._live:
            self._live, self._resumed = False, True


def _encode_control(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}{SEP}data: {json.dumps(data)}{SEP}{SEP}".encode()


async def _control_stream(control: ControlChannel) -> AsyncGenerator[bytes, None]:
    async with control.subscribe() as client:
        while True:
            chunk = await client.queue.get()
            if client.behind and not chunk:
                yield _encode_control(
                    "error", {"error": f"fell {CONTROL_BUFFER} events behind: reconnect"}
                )
                return
            yield chunk


# -- one session --------------------------------------------------------------------------


class SessionQuery(Query):
    from_: str = Field(
        "start",
        alias="from",
        pattern=r"^(start|now|[0-9]{1,19})$",
        description="start, now, or an event id: after it (a reconnect's Last-Event-ID "
        "header takes precedence)",
    )


class _Ends:
    """The closed event's id of runs this server streamed to their end, newest kept:
    a reconnect at or after it is answered 204 without asking the broker."""

    def __init__(self) -> None:
        self._ids: OrderedDict[str, int] = OrderedDict()

    def remember(self, run_id: str, closed_id: int) -> None:
        self._ids[run_id] = closed_id
        self._ids.move_to_end(run_id)
        while len(self._ids) > ENDS_REMEMBERED:
            self._ids.popitem(last=False)

    def ended(self, run_id: str, last_id: int) -> bool:
        closed_id = self._ids.get(run_id)
        return closed_id is not None and last_id >= closed_id


def _start_of(request: Request) -> tuple[Start, int | None]:
    """Where to start, and the Last-Event-ID when the client sent one."""
    query = query_of(SessionQuery, request)
    header = request.headers.get("last-event-id", "").strip()
    if header:
        if not header.isdigit() or int(header) > MAX_ID:
            raise BadInput(f"Last-Event-ID {header[:40]!r} is not an event id")
        return int(header), int(header)
    value: str = query.from_
    if value in ("start", "now"):
        return ("start" if value == "start" else "now"), None
    if int(value) > MAX_ID:
        raise BadInput(f"from: {value} is not an event id")
    return int(value), None


async def _session_response(
    namespace: Namespace, hubs: _Hubs, ends: _Ends, request: Request
) -> Response:
    run_or_agent = request.path_params["run_id"]
    start, last_id = _start_of(request)
    if last_id is not None and ends.ended(run_or_agent, last_id):
        return Response(status_code=204)
    run = await hubs.find(run_or_agent)  # 404, 410
    if last_id is not None and (
        ends.ended(run.run_id, last_id) or await _closed_by(namespace, run, last_id)
    ):
        return Response(status_code=204)
    return _event_source(_session_stream(hubs, ends, run, start))


async def _closed_by(namespace: Namespace, run: RunSession, last_id: int) -> bool:
    """Whether the run's `closed` is at or before `last_id`, as far as the message that
    holds `last_id` says (a reconnect after `end` sends the closed event's own id)."""
    offset = offset_of(last_id)
    gateway = await namespace.gateway()
    for item in await stream.items_between(gateway, STREAM, offset, offset):
        if item.offset != offset or (item.message.headers or {}).get(RUN_HEADER) != run.run_id:
            continue
        for index, event in enumerate(parse_batch(item.body) or []):
            if event.final and event_id(offset, index) <= last_id:
                return True
    return False


def _encode_session(id_: int, event: SessionEvent) -> bytes:
    data = event.model_dump_json()
    if event.kind == "expired":  # a notice, not a stored event: no SSE id (see above)
        return f'event: expired{SEP}data: {{"id":{id_},{data[1:]}{SEP}{SEP}'.encode()
    return f'id: {id_}{SEP}event: {event.kind}{SEP}data: {{"id":{id_},{data[1:]}{SEP}{SEP}'.encode()


Item = tuple[int, SessionEvent, bytes]  # an event, its id, and its SSE encoding


async def _session_stream(
    hubs: _Hubs, ends: _Ends, run: RunSession, start: Start
) -> AsyncGenerator[bytes, None]:
    source = hubs.source(run, start)
    sent_at = 0.0
    try:
        while True:
            # At most one write each SEND_SECONDS: a run printing a line each millisecond
            # costs each client some 50 writes a second, not a thousand (CPU, here and in
            # the browser), for at most SEND_SECONDS more latency.
            wait = sent_at + SEND_SECONDS - asyncio.get_running_loop().time()
            if wait > 0:
                await asyncio.sleep(wait)
            items = await source.take()
            sent_at = asyncio.get_running_loop().time()
            if not items:
                if source.error is not None:  # the broker stayed away: the client retries
                    yield _encode_control("error", {"error": source.error})
                return
            # Everything read so far in one write: a fast run's lines cost one send each
            # batch, not one each line.
            yield b"".join(encoded for _, _, encoded in items)
            id_, event, _ = items[-1]
            if event.final:
                ends.remember(run.run_id, id_)
                outcome = (event.data or {}).get("outcome")
                end = {"run_id": run.run_id, "closed_id": id_, "outcome": outcome}
                yield _encode_control("end", end)
                return
    finally:
        with anyio.move_on_after(CLOSE_SECONDS, shield=True):
            await source.close()


class _Source(Protocol):
    error: str | None

    async def take(self) -> list[Item]:
        """What has been read since the last take (waiting for something); [] at the end."""
        ...

    async def close(self) -> None: ...


class _Hubs:
    """One reader per run for every client that follows it from its start, or resumes
    within what that reader has kept (`_Hub`); a reader of its own (`_Pump`) for a
    client starting `now`, or resuming before what the run's hub kept."""

    def __init__(self, namespace: Namespace) -> None:
        self.namespace = namespace
        self._hubs: dict[str, _Hub] = {}
        self._finding: dict[str, asyncio.Task[RunSession]] = {}

    async def find(self, run_or_agent: str) -> RunSession:
        """`session_reader.find_run`, one lookup shared by the requests that ask for the
        same run (or agent) while it runs: fifty pages opened on a run that has just
        started cost the broker one search of the stream, not fifty. A client that
        leaves meanwhile does not cancel it for the others."""
        finding = self._finding.get(run_or_agent)
        if finding is None:
            finding = asyncio.create_task(session_reader.find_run(self.namespace, run_or_agent))
            self._finding[run_or_agent] = finding
            finding.add_done_callback(lambda done: self._found(run_or_agent, done))
        return await asyncio.shield(finding)

    def _found(self, run_or_agent: str, done: asyncio.Task[RunSession]) -> None:
        if self._finding.get(run_or_agent) is done:
            del self._finding[run_or_agent]
        if not done.cancelled():
            done.exception()  # its error is its waiters' (all of them may have left)

    def source(self, run: RunSession, start: Start) -> _Source:
        hub = self._hubs.get(run.run_id)
        if start != "now" and (hub is None or hub.error is not None):
            hub = self._hubs[run.run_id] = _Hub(self, run)
        if hub is not None and start != "now" and hub.covers(start):
            return hub.join(start)
        follow = session_reader.follow(self.namespace, run.run_id, start, found=run)
        return _Pump(follow)

    def drop(self, hub: _Hub) -> None:
        if self._hubs.get(hub.run.run_id) is hub:
            del self._hubs[hub.run.run_id]


class _Hub:
    """A run's session read once, from its start, kept in memory (the newest HUB_KEPT
    events) for every client that follows it: a hundred pages on one run cost the
    broker one stream consumer, and each event is encoded once. It reads while it has
    clients, and HUB_LINGER_SECONDS after the last one left (a page reconnecting, or
    reloaded, resumes from memory)."""

    def __init__(self, hubs: _Hubs, run: RunSession) -> None:
        self.hubs, self.run = hubs, run
        self.items: list[Item] = []
        self.ids: list[int] = []
        self.dropped = 0  # items trimmed from the front (HUB_KEPT)
        self.covered_after: int | None = None  # None: from the run's start; else after this id
        self.finished = False
        self.error: str | None = None
        self.clients = 0
        self._changed = asyncio.Event()
        self._linger: asyncio.TimerHandle | None = None
        follow = session_reader.follow(hubs.namespace, run.run_id, "start", found=run)
        self._task = asyncio.create_task(self._read(follow))

    def covers(self, start: Start) -> bool:
        if self.covered_after is None:
            return True
        return isinstance(start, int) and start >= self.covered_after

    def join(self, start: Start) -> _HubClient:
        self.clients += 1
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        return _HubClient(self, self.dropped, start if isinstance(start, int) else None)

    def leave(self) -> None:
        self.clients -= 1
        if self.clients == 0:
            self._linger = asyncio.get_running_loop().call_later(HUB_LINGER_SECONDS, self.stop)

    def stop(self) -> None:
        self.hubs.drop(self)
        self._task.cancel()  # its reader closes its channel on the way out (see above)

    async def _read(self, follow: AsyncGenerator[tuple[int, SessionEvent], None]) -> None:
        try:
            async with contextlib.aclosing(follow) as events:
                async for id_, event in events:
                    self.items.append((id_, event, _encode_session(id_, event)))
                    self.ids.append(id_)
                    if len(self.items) > HUB_KEPT:  # a long run: keep its newest half
                        cut = len(self.items) // 2
                        self.covered_after = self.ids[cut - 1]
                        del self.items[:cut], self.ids[:cut]
                        self.dropped += cut
                    self._wake()
                    if event.final:
                        break
        except CoveyError as err:
            self.error = str(err)
            self.hubs.drop(self)
        finally:
            self.finished = True
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        await self._changed.wait()


class _HubClient:
    """One client's place in a hub: the absolute index of the next item it gets, and
    until it has passed it, the id it resumes after."""

    def __init__(self, hub: _Hub, position: int, after: int | None) -> None:
        self.hub, self.position, self.after = hub, position, after
        self.error: str | None = None
        self._left = False

    async def take(self) -> list[Item]:
        hub = self.hub
        while True:
            if self.position < hub.dropped:  # fell behind what the hub keeps: reconnect
                self.error = "fell behind: reconnect with Last-Event-ID"
                return []
            local = self.position - hub.dropped
            if local < len(hub.items) and self.after is not None:  # ids only grow
                local = bisect.bisect_right(hub.ids, self.after, lo=local)
                self.position = hub.dropped + local
                if local < len(hub.items):
                    self.after = None
            if local < len(hub.items):
                items = hub.items[local:]
                self.position += len(items)
                return items
            if hub.finished:
                self.error = hub.error
                return []
            await hub.changed()

    async def close(self) -> None:
        if not self._left:
            self._left = True
            self.hub.leave()


class _Pump:
    """Reads a session into a buffer in a task of its own (see the module's docstring),
    up to SESSION_BUFFER events ahead of the client."""

    def __init__(self, source: AsyncGenerator[tuple[int, SessionEvent], None]) -> None:
        self._source = source
        self._buffer: deque[tuple[int, SessionEvent]] = deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._finished = False
        self.error: str | None = None
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async with contextlib.aclosing(self._source) as items:
                async for item in items:
                    self._buffer.append(item)
                    self._ready.set()
                    if len(self._buffer) >= SESSION_BUFFER:
                        self._room.clear()
                        await self._room.wait()
                    if item[1].final:
                        break
        except CoveyError as err:
            self.error = str(err)
        finally:
            self._finished = True
            self._ready.set()

    async def take(self) -> list[Item]:
        while not self._buffer and not self._finished:
            self._ready.clear()
            await self._ready.wait()
        if self._task.done() and not self._task.cancelled() and self._task.exception():
            raise self._task.exception()  # type: ignore[misc]  # a bug: the response's 500
        items = [(id_, event, _encode_session(id_, event)) for id_, event in self._buffer]
        self._buffer.clear()
        self._room.set()
        return items

    async def close(self) -> None:
        """Stop reading: the reader closes its channel, and with it the stream consumer."""
        self._task.cancel()
        await asyncio.wait([self._task])


# -- the OpenAPI document ------------------------------------------------------------------


def openapi_paths(error: dict[str, Any]) -> dict[str, Any]:
    """Both paths for web.openapi_document; `error` is the ErrorView schema's reference."""

    def answer(description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": error}}}

    stream_200 = {
        "description": "a stream of server-sent events (text/event-stream), open until the "
        "client closes it (a session's: until its `end` event)",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    return {
        "/api/events": {
            "get": {
                "summary": "the control channel as server-sent events, `event:` the kind",
                "operationId": "control_events",
                "parameters": [],
                "responses": {
                    "200": stream_200,
                    "400": answer("bad input"),
                },
            }
        },
        "/api/sessions/{run_id}/events": {
            "get": {
                "summary": "one run's session as server-sent events, resumable by Last-Event-ID",
                "operationId": "session_events",
                "parameters": [
                    {"name": "run_id", "in": "path", "required": True,
                     "description": "a run id, or an agent (its live run, else its last)",
                     "schema": {"type": "string"}},
                    {"name": "from", "in": "query", "required": False,
                     "description": "start, now, or an event id (after it)",
                     "schema": {"type": "string", "pattern": "^(start|now|[0-9]{1,19})$",
                                "default": "start"}},
                    {"name": "Last-Event-ID", "in": "header", "required": False,
                     "description": "a reconnecting client's last id: resume strictly after it",
                     "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"}},
                ],
                "responses": {
                    "200": stream_200,
                    "204": {"description": "the run ended at or before Last-Event-ID: "
                            "nothing more will come (an EventSource stops reconnecting)"},
                    "400": answer("bad input"),
                    "404": answer("no such run"),
                    "410": answer("the run's session is no longer retained"),
                    "503": answer("the broker cannot be reached"),
                },
            }
        },
    }  # fmt: skip
