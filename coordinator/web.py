"""The web server: one ASGI app (starlette) with the page, the JSON API and `/metrics`.

`covey supervise` serves it on its metrics port, with `/metrics` as before;
`covey web` serves it alone, over a namespace, running no agents. It binds
127.0.0.1 unless told otherwise: beyond loopback, put a reverse proxy with TLS
in front of it (see the README's "Web page").

The app is a thin layer: each API path is one function of api.py, its query
checked by a pydantic model, its answer a pydantic view, so that the OpenAPI
document at `/api/openapi.json` is drawn from the same models the answers are
made of. Errors are JSON (`{"error": ..., "status": ...}`) with the status a
client can act on: 400 for bad input, 404 for an unknown name or id, 410 for a
session retention removed, 503 when the broker cannot be reached. Nothing a
client sends answers 500; a 500 is a bug, logged with its traceback.

The page is static (page/ in the package: HTML, CSS and one script) and fetches
nothing from anywhere else; every answer carries a Content-Security-Policy that
allows scripts and styles from this origin only, so agent output that reaches
the page as text can never run as code there.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any

import uvicorn
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from coordinator import __version__, actions, api
from coordinator.errors import BadInput, CoveyError, ExitCode, NotFound, first_problem
from coordinator.logs import get_logger

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from coordinator.namespace import Namespace

log = get_logger("covey.web")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464  # Prometheus' registry number for covey; the page lives beside /metrics

# Only this origin's own script and styles; no inline code, no frames, no plugins.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


# -- queries: what each path accepts -----------------------------------------------------


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LimitQuery(Query):
    limit: int = Field(api.DEFAULT_LIMIT, ge=1, le=api.MAX_LIMIT, description="how many")


class MaxAgeQuery(Query):
    max_age: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="how old an answer is taken, in seconds (the Age header says how old "
        "it is); 0, the default: one begun after this request, shared by the requests "
        "at the same moment",
    )


class RunsQuery(LimitQuery):
    agent: str | None = Field(None, description="only this agent's runs")
    outcome: str | None = Field(None, description="only runs that ended so (ok, failed, …)")


def _stream_point(value: object) -> object:
    """An offset (digits) or an ISO time, as written: not pydantic's lax reading, which
    takes `0.5` for a Unix time."""
    if not isinstance(value, str):
        return value
    if value.isascii() and value.isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("give an offset (digits) or an ISO time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class ChangelogQuery(LimitQuery):
    since: Annotated[
        Annotated[int, Field(ge=0)] | datetime | None, BeforeValidator(_stream_point)
    ] = Field(None, description="an offset, or an ISO time: the first `limit` from there")


def _query(model: type[Query], request: Request) -> Any:
    """The request's query, checked: BadInput (400) naming the first problem."""
    params = dict(request.query_params)
    if len(params) != len(request.query_params.multi_items()):
        raise BadInput("each query parameter may be given once")
    try:
        return model.model_validate(params)
    except ValidationError as err:
        field, problem = first_problem(err)
        raise BadInput(f"{field}: {problem}") from None


# -- the API's paths ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One GET path of the API: what it answers with and what it accepts, for the
    OpenAPI document as for the route."""

    path: str
    summary: str
    answer: Any  # a View, or list[View]
    handler: Callable[[Namespace, Request], Awaitable[Any]]
    query: type[Query] | None = None
    path_params: tuple[str, ...] = ()
    # Answered from one look shared by the requests that can take it (shared.py): the
    # handler reads nothing of the request, whose query is a MaxAgeQuery.
    shared: bool = False


async def _agents(namespace: Namespace, request: Request) -> Any:
    return await api.agents(namespace)


async def _locks(namespace: Namespace, request: Request) -> Any:
    return await api.locks(namespace)


async def _runs(namespace: Namespace, request: Request) -> Any:
    query = _query(RunsQuery, request)
    return await api.runs(namespace, query.agent, query.outcome, query.limit)


async def _run(namespace: Namespace, request: Request) -> Any:
    return await api.run(namespace, request.path_params["run_id"])


async def _sessions(namespace: Namespace, request: Request) -> Any:
    return await api.sessions(namespace, _query(LimitQuery, request).limit)


async def _changelog(namespace: Namespace, request: Request) -> Any:
    query = _query(ChangelogQuery, request)
    return await api.changelog(namespace, query.since, query.limit)


async def _dead_letters(namespace: Namespace, request: Request) -> Any:
    return await api.dead_letters(namespace)


async def _dead_letter(namespace: Namespace, request: Request) -> Any:
    return await api.dead_letter(namespace, request.path_params["letter_id"])


ENDPOINTS = (
    Endpoint("/api/agents", "agents: state, pending mail, lock, last and next run",
             list[api.AgentView], _agents, MaxAgeQuery, shared=True),
    Endpoint("/api/locks", "shared locks and who holds them", list[api.LockView], _locks),
    Endpoint("/api/runs", "recent runs, oldest first", list[api.RunView], _runs, RunsQuery),
    Endpoint("/api/runs/{run_id}", "one run's record", api.RunView, _run,
             path_params=("run_id",)),
    Endpoint("/api/sessions", "live and recent sessions, oldest first", list[api.RunView],
             _sessions, LimitQuery),
    Endpoint("/api/changelog", "changelog entries, oldest first", list[api.EntryView],
             _changelog, ChangelogQuery),
    Endpoint("/api/dead", "dead and unroutable letters", list[api.DeadLetterView],
             _dead_letters),
    Endpoint("/api/dead/{letter_id}", "one dead letter, by id or a prefix of 4 or more",
             api.DeadLetterView, _dead_letter, path_params=("letter_id",)),
)  # fmt: skip


def _route(namespace: Namespace, endpoint: Endpoint) -> Route:
    if endpoint.shared:
        return _shared_route(namespace, endpoint)

    async def answer(request: Request) -> Response:
        return JSONResponse(api.as_json(await endpoint.handler(namespace, request)))

    return Route(endpoint.path, answer, methods=["GET"])


def _shared_route(namespace: Namespace, endpoint: Endpoint) -> Route:
    """One look (encoded once) for every request that takes an answer as old as it is."""
    from coordinator.shared import SharedAnswer

    looks: SharedAnswer[bytes] = SharedAnswer()

    async def answer(request: Request) -> Response:
        query = _query(MaxAgeQuery, request)

        async def look() -> bytes:  # for every request it is shared with
            return bytes(JSONResponse(api.as_json(await endpoint.handler(namespace, request))).body)

        # Keyed by the roster it was made of: after a reload (SIGHUP), none older is taken.
        body, age = await looks.get(query.max_age, look, namespace.snapshot)
        return Response(body, media_type="application/json", headers={"age": f"{age:.0f}"})

    return Route(endpoint.path, answer, methods=["GET"])


# -- the OpenAPI document -----------------------------------------------------------------

PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "run_id": {"type": "string", "minLength": 1},
    "letter_id": {"type": "string", "minLength": 4},  # a prefix of 4 or more
}


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for the GET API, from the very models it answers with."""
    answers = [endpoint.answer for endpoint in ENDPOINTS] + [api.ErrorView]
    definitions: dict[str, Any] = {}
    refs: list[dict[str, Any]] = []
    for answer in answers:
        schema = TypeAdapter(answer).json_schema(
            ref_template="#/components/schemas/{model}", mode="serialization"
        )
        definitions.update(schema.pop("$defs", {}))
        if "title" in schema and "properties" in schema:  # a model: a schema of its own
            definitions[schema["title"]] = schema
            schema = {"$ref": f"#/components/schemas/{schema['title']}"}
        refs.append(schema)
    error = {"$ref": "#/components/schemas/ErrorView"}
    paths: dict[str, Any] = {}
    for endpoint, schema in zip(ENDPOINTS, refs, strict=False):
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": PATH_PARAMETERS[name]}
            for name in endpoint.path_params
        ]
        if endpoint.query is not None:
            query = endpoint.query.model_json_schema()
            for name, prop in query["properties"].items():
                prop = {k: v for k, v in prop.items() if k != "title"}
                description = prop.pop("description", None)
                parameters.append(
                    {"name": name, "in": "query", "required": False, "schema": prop}
                    | ({"description": description} if description else {})
                )
        responses: dict[str, Any] = {
            "200": {"description": "OK", "content": {"application/json": {"schema": schema}}},
            "400": {"description": "bad input", "content": {"application/json": {"schema": error}}},
            "503": {
                "description": "the broker cannot be reached",
                "content": {"application/json": {"schema": error}},
            },
        }
        names_something = endpoint.query is not None and "agent" in endpoint.query.model_fields
        if endpoint.path_params or names_something:
            responses["404"] = {
                "description": "no such id, or no such agent",
                "content": {"application/json": {"schema": error}},
            }
        paths[endpoint.path] = {
            "get": {
                "summary": endpoint.summary,
                "operationId": endpoint.handler.__name__.lstrip("_"),
                "parameters": parameters,
                "responses": responses,
            }
        }
    from coordinator import sse  # it builds on this module: imported once this one is

    paths.update(sse.openapi_paths(error))
    paths.update(actions.openapi_paths(definitions))  # the session and the actions (POST)
    return {
        "openapi": "3.1.0",
        "info": {"title": "covey", "version": __version__},
        "paths": paths,
        "components": {"schemas": definitions},
    }


# -- errors -------------------------------------------------------------------------------

# Exit codes (the CLI's) to HTTP statuses: the same error means the same thing here.
_STATUSES = {
    ExitCode.BAD_INPUT: 400,
    ExitCode.NO_RECIPIENT: 404,
    ExitCode.BROKER_UNAVAILABLE: 503,
    ExitCode.NOT_RETAINED: 410,
    ExitCode.NOT_RUNNING: 409,
}


def status_of(err: CoveyError) -> int:
    if isinstance(err, NotFound):
        return 404
    return _STATUSES.get(err.exit_code, 500)


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(api.ErrorView(error=message, status=status).model_dump(), status)


async def _covey_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, CoveyError)
    return error_response(status_of(err), str(err))


async def _http_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, HTTPException)
    if err.status_code == 404:
        path = request.url.path
        return error_response(404, f"no such path {path!r}: /api/openapi.json lists them")
    if err.status_code == 405:
        # RFC 9110: a 405 says which methods the path does take.
        answer = error_response(405, f"{request.method} is not allowed on {request.url.path}")
        answer.headers.update(err.headers or {})
        return answer
    answer = error_response(err.status_code, str(err.detail))
    answer.headers.update(err.headers or {})
    return answer


async def _bug(request: Request, err: Exception) -> Response:
    log.error("a bug answering a request", path=request.url.path, exc_info=err)
    return error_response(500, "a bug in covey: its log has the traceback")


def _broker_errors() -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    """aio-pika's own errors that escape the core: the broker's trouble, a 503."""
    from coordinator.gateway import BROKER_ERRORS

    async def broker_error(request: Request, err: Exception) -> Response:
        return error_response(503, f"lost RabbitMQ ({err}); check that it runs, then retry")

    return dict.fromkeys(BROKER_ERRORS, broker_error)


# -- the app ------------------------------------------------------------------------------


class SecurityHeaders:
    """Adds the security headers to every answer, the page's and the API's alike."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(namespace: Namespace, registry: CollectorRegistry | None = None) -> Starlette:
    """The whole app over `namespace`; with `registry`, `/metrics` serves it."""
    document = openapi_document()

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    routes: list[BaseRoute] = [
        *(_route(namespace, endpoint) for endpoint in ENDPOINTS),
        Route("/api/openapi.json", openapi, methods=["GET"]),
    ]
    from coordinator import sse  # it builds on this module: imported once this one is

    routes += sse.routes(namespace)  # its two event streams
    routes += actions.routes(namespace)  # the session and the actions (POST, signed in)
    if registry is not None:
        from prometheus_client import make_asgi_app

        # A Route, not a Mount: Prometheus scrapes `/metrics`, which a Mount would not match.
        routes.append(Route("/metrics", _AsgiEndpoint(make_asgi_app(registry))))
    routes.append(Mount("/", StaticFiles(directory=str(_page_folder()), html=True)))
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        CoveyError: _covey_error,
        HTTPException: _http_error,
        **_broker_errors(),
        Exception: _bug,
    }
    return Starlette(
        routes=routes,
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers=handlers,
    )


class _AsgiEndpoint:
    """An ASGI app as a Route's endpoint (a Route calls a plain function with a request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _page_folder() -> Any:
    return resources.files("coordinator") / "page"


# -- serving it ---------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn inside covey's own event loop: the supervisor's signal handlers decide
    when to stop, so uvicorn must not install its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebServer:
    """The app on a socket bound at once (so a busy port is one line before anything
    starts), served in this process's event loop until `stop()`."""

    def __init__(self, app: ASGIApp, sock: socket.socket) -> None:
        self.sock = sock
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self._server = _Server(config)

    @classmethod
    def bind(cls, app: ASGIApp, host: str, port: int, flag: str = "--port") -> WebServer:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            sock.close()
            raise BadInput(
                f"cannot serve on {host}:{port} ({err.strerror}): pick another {flag}"
            ) from None
        sock.listen(128)
        sock.setblocking(False)
        return cls(app, sock)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def serve(self) -> None:
        await self._server.serve(sockets=[self.sock])

    def stop(self) -> None:
        self._server.should_exit = True

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Served while the block runs; stopped (open connections closed) after it."""
        task = asyncio.create_task(self.serve())
        try:
            yield
        finally:
            self.stop()
            self._server.force_exit = True  # SSE streams would otherwise hold it open
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.sock.close()
