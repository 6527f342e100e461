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

Streams and disconnects: the session reader consumes `covey.sessions` with a
callback into a queue (never aio-pika's queue iterator: leaving one nacks, and a
stream answers that by closing the whole connection, 540). It runs in a task of
its own (`_Pump`), not in the response's generator: when the HTTP client goes,
sse-starlette cancels the response's task group, and anyio keeps cancelling every
await inside it, so a reader cancelled there could not even close its channel.
The pump instead is cancelled once, as plain asyncio does, and its reader closes
its channel (which cancels the stream consumer) on the way out, while the
response waits for that under a shield.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

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
from coordinator.gateway import BROKER_ERRORS, RECONNECT_SECONDS
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
ENDS_REMEMBERED = 10_000  # runs whose closed id this server streamed, for the 204
MAX_ID = 2**63 - 1
SEP = "\n"


def routes(namespace: Namespace) -> list[BaseRoute]:
    """The two event streams over `namespace`."""
    control = ControlChannel(namespace)
    ends = _Ends()

    async def control_events(request: Request) -> Response:
        query_of(Query, request)  # no parameters: an unknown one is a 400
        return _event_source(_control_stream(control))

    async def session_events(request: Request) -> Response:
        return await _session_response(namespace, ends, request)

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
        while True:
            try:
                await self._listen_until_closed()
            except (*BROKER_ERRORS, CoveyError) as err:
                log.warning("cannot listen for control events; trying again", problem=str(err))
            if self._live:
                self._live, self._resumed = False, True
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _listen_until_closed(self) -> None:
        gateway = await self.namespace.gateway()
        channel = await gateway.open_channel()
        closed = asyncio.Event()
        channel.close_callbacks.add(lambda *_: closed.set())
        try:
            await gateway.listen(channel, EVENTS_EXCHANGE, ["#"], self._on_message)
            self._live = True
            self._send(_encode_control("listening", {"resumed": self._resumed}))
            if not channel.is_closed:
                await closed.wait()
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*BROKER_ERRORS):
                    await channel.close()


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


async def _session_response(namespace: Namespace, ends: _Ends, request: Request) -> Response:
    run_or_agent = request.path_params["run_id"]
    start, last_id = _start_of(request)
    if last_id is not None and ends.ended(run_or_agent, last_id):
        return Response(status_code=204)
    run = await session_reader.find_run(namespace, run_or_agent)  # 404, 410
    if last_id is not None and (
        ends.ended(run.run_id, last_id) or await _closed_by(namespace, run, last_id)
    ):
        return Response(status_code=204)
    return _event_source(_session_stream(namespace, ends, run, start))


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


async def _session_stream(
    namespace: Namespace, ends: _Ends, run: RunSession, start: Start
) -> AsyncGenerator[bytes, None]:
    pump = _Pump(session_reader.follow(namespace, run.run_id, start, found=run))
    try:
        while True:
            items = await pump.take()
            if not items:
                if pump.error is not None:  # the broker stayed away: the client retries
                    yield _encode_control("error", {"error": str(pump.error)})
                return
            # Everything read so far in one write: a fast run's lines cost one send each
            # batch, not one each line.
            yield b"".join(_encode_session(id_, event) for id_, event in items)
            id_, event = items[-1]
            if event.final:
                ends.remember(run.run_id, id_)
                outcome = (event.data or {}).get("outcome")
                end = {"run_id": run.run_id, "closed_id": id_, "outcome": outcome}
                yield _encode_control("end", end)
                return
    finally:
        with anyio.move_on_after(CLOSE_SECONDS, shield=True):
            await pump.close()


class _Pump:
    """Reads a session into a buffer in a task of its own (see the module's docstring),
    up to SESSION_BUFFER events ahead of the client."""

    def __init__(self, source: AsyncGenerator[tuple[int, SessionEvent], None]) -> None:
        self._source = source
        self._buffer: deque[tuple[int, SessionEvent]] = deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._finished = False
        self.error: BaseException | None = None
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
            self.error = err
        finally:
            self._finished = True
            self._ready.set()

    async def take(self) -> list[tuple[int, SessionEvent]]:
        """What has been read since the last take (waiting for something); [] at the end."""
        while not self._buffer and not self._finished:
            self._ready.clear()
            await self._ready.wait()
        if self._task.done() and not self._task.cancelled() and self._task.exception():
            raise self._task.exception()  # type: ignore[misc]  # a bug: the response's 500
        items = list(self._buffer)
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
