"""The web app's actions: stop a run, request a run, send mail — for a signed-in person only.

Everything else the app serves is read-only and open to whoever reaches it; these
paths change things, so each one:

* is POST (a GET on it is 405), and takes its input as a JSON body (415 for any
  other content type: a cross-site form can send none without the browser asking
  first);
* comes from this page's own origin: an `Origin` header, when the browser sends one,
  must name the `Host` the request was made to (behind a reverse proxy, the proxy
  must pass `Host` on), and `Sec-Fetch-Site`, when sent, must be `same-origin`;
* names a person by a web token (webtokens.py), as `Authorization: Bearer TOKEN`, or
  as the cookie POST /api/session sets (HttpOnly, SameSite=Strict). With the cookie,
  the request must also carry `X-CSRF-Token`: an HMAC of the token under a secret
  this server process drew at start, which GET /api/session hands to the page. A
  bearer token needs none, since no browser sends that header by itself.

What the person may then do is the broker's decision, not this module's. In a
provisioned namespace each action is taken over a connection of the person's own
broker user (their credentials from `covey provision`, one connection per person,
kept), so mail is signed by them and a stop or a run request is allowed or refused
by their topic permissions exactly as `covey stop` and `covey run --via-supervisor`
run as them would be. In the open set-up everyone shares the server's connection,
as everyone shares one broker user there; the person is still who the run record
and the mail name.

Errors are the app's JSON errors: 401 without a valid token, 403 for a refused
origin, a missing or wrong CSRF token, or the broker refusing the person's user.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from coordinator import api
from coordinator.display import printable
from coordinator.errors import (
    BadInput,
    BrokerUnavailable,
    ConfigError,
    CoveyError,
    ExitCode,
    NoRecipient,
    NotFound,
    first_problem,
)
from coordinator.events import Event
from coordinator.logs import get_logger
from coordinator.names import Address
from coordinator.stopping import REASON_LIMIT
from coordinator.webtokens import MAX_TOKEN_CHARS, TokenStore, digest, tokens_path

if TYPE_CHECKING:
    from coordinator.namespace import Namespace, Snapshot

log = get_logger("covey.web")

COOKIE = "covey_token"
COOKIE_MAX_AGE = 7 * 24 * 3600  # a week of the page remembering who signed in on it
CSRF_HEADER = "X-CSRF-Token"  # headers are looked up regardless of case
MAX_REQUEST_BYTES_OVER_BODY = 64 * 1024  # a JSON body's quoting and its other fields
DEFAULT_PORTS = {"http": 80, "https": 443}
HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]

Handler = Callable[[Request], Awaitable[Response]]


# -- what the actions accept and answer --------------------------------------------------


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionBody(Body):
    token: str = Field(max_length=MAX_TOKEN_CHARS, description="from `covey web token NAME`")


class StopBody(Body):
    reason: str | None = Field(
        None, max_length=REASON_LIMIT, description="why (kept in the run's record)"
    )


class MailBody(Body):
    to: str = Field(description="agent:NAME, NAME, team:NAME, human:NAME or all")
    subject: str
    body: str = ""


class SessionView(api.View):
    """Who is signed in, and the X-CSRF-Token their cookie's requests must carry."""

    person: str
    csrf: str


class RunRequestedView(api.View):
    """A run request the broker has taken: a supervisor runs the agent soon."""

    agent: str
    requested_by: str


class MailSentView(api.View):
    """Mail the broker has taken, by its id."""

    id: str


# -- who asks ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signed:
    """A request's person, and whether it came with the cookie (so needs CSRF)."""

    person: Address
    token: str
    by_cookie: bool


def _refuse(status: int, message: str) -> HTTPException:
    return HTTPException(status, message)


class Guard:
    """Tells who a request comes from, and whether it may change anything."""

    def __init__(self, namespace: Namespace) -> None:
        self.namespace = namespace
        self._secret = secrets.token_bytes(32)  # new with each process: CSRF tokens too
        self._stores: dict[str, TokenStore] = {}

    def store(self) -> TokenStore:
        path = tokens_path(self.namespace.settings)  # state_dir may change on SIGHUP
        return self._stores.setdefault(str(path), TokenStore(path))

    def csrf(self, token: str) -> str:
        return hmac.new(self._secret, digest(token).encode(), hashlib.sha256).hexdigest()

    def person_of(self, token: str) -> Address:
        """The person whose token this is, still in the roster; 401 otherwise."""
        person = self.store().person_of(token)
        if person is None:
            raise _refuse(401, "not a valid web token (`covey web token NAME` gives a new one)")
        address = Address.parse(person)
        if address.name not in self.namespace.roster.humans:
            raise _refuse(401, f"{address} is no longer in the roster")
        return address

    def signed(self, request: Request) -> Signed:
        """Who sends `request`: its bearer token, else its cookie; 401 without either."""
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, bearer = header.partition(" ")
            if scheme.lower() != "bearer" or not bearer.strip():
                raise _refuse(401, "use Authorization: Bearer TOKEN")
            return Signed(self.person_of(bearer.strip()), bearer.strip(), by_cookie=False)
        token = request.cookies.get(COOKIE)
        if not token:
            raise _refuse(
                401,
                "sign in first: POST /api/session with a token from `covey web token NAME`, "
                "or send Authorization: Bearer TOKEN",
            )
        return Signed(self.person_of(token), token, by_cookie=True)

    def acting(self, request: Request) -> Signed:
        """The person a state-changing request acts for, once it passed every check."""
        same_origin(request)
        signed = self.signed(request)
        if signed.by_cookie:
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode(), self.csrf(signed.token).encode()):
                raise _refuse(
                    403,
                    f"missing or wrong {CSRF_HEADER} header: GET /api/session gives the value "
                    "for this sign-in",
                )
        return signed


def same_origin(request: Request) -> None:
    """403 unless the request comes from this page's own origin, as far as the browser
    says: `Sec-Fetch-Site` same-origin (or none: typed, not sent by a page), and an
    `Origin`, when there is one, naming the host the request was sent to."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise _refuse(403, f"a {site} request may not act: use this page's own origin")
    origin = request.headers.get("origin")
    if origin is None:
        return  # not a browser, or one that sends no Origin on same-origin requests
    if not _same_host(origin, request.headers.get("host", "")):
        raise _refuse(403, "a request from another origin may not act: use this page's own")


def _same_host(origin: str, host: str) -> bool:
    try:
        sent = urlsplit(origin)
        asked = urlsplit(f"//{host}")
        if sent.scheme not in DEFAULT_PORTS or not sent.hostname or not asked.hostname:
            return False  # `null` (a sandboxed frame, a file), or something else odd
        # A Host without a port is the default one of the scheme the browser used.
        default = DEFAULT_PORTS[sent.scheme]
        return (sent.hostname, sent.port or default) == (asked.hostname, asked.port or default)
    except ValueError:  # a port that is not a number
        return False


# -- whom the broker sees ---------------------------------------------------------------


class People:
    """The namespace each person's actions go through: their own broker user's in a
    provisioned namespace (one connection each, kept), else the server's own."""

    def __init__(self, namespace: Namespace) -> None:
        self.namespace = namespace
        self._theirs: dict[Address, tuple[str, Snapshot, Namespace]] = {}
        self._opening = asyncio.Lock()

    async def namespace_for(self, person: Address) -> Namespace:
        from coordinator import identity
        from coordinator.namespace import Namespace, Snapshot

        base = self.namespace.snapshot
        settings = base.settings
        if not identity.provisioned(settings):
            return self.namespace
        try:
            url = identity.url_for(settings, person)
        except ConfigError as err:
            raise _refuse(403, str(err)) from None
        user = identity.user_of(person, settings.user_prefix)
        if identity.url_user(url) != user:
            # Acting with the server's own user would make the broker judge the wrong one.
            raise _refuse(
                403,
                f"no broker credentials of {person}'s own in {settings.credentials_dir}: "
                "run `covey provision` where this server runs",
            )
        async with self._opening:
            kept = self._theirs.get(person)
            if kept is not None and kept[0] == url:
                _, seen, theirs = kept
                if seen is not base:  # covey.toml or the roster read again (SIGHUP)
                    theirs.swap(Snapshot(settings.with_login(url), base.roster))
                    self._theirs[person] = (url, base, theirs)
                return theirs
            if kept is not None:  # a new password (`provision --rotate`): log in again
                with contextlib.suppress(Exception):
                    await kept[2].close()
            own = settings.with_login(url)  # their login, at every node
            theirs = Namespace(own, base.roster, name=f"covey web {person}")
            self._theirs[person] = (url, base, theirs)
            return theirs


@contextlib.contextmanager
def broker_decides(person: Address) -> Iterator[None]:
    """The broker refusing the person's user an operation is a 403 with its words,
    not the 503 of a broker that cannot be reached."""
    import aiormq

    from coordinator.gateway import reply_text

    refusal = aiormq.exceptions.ChannelAccessRefused
    try:
        yield
    except (refusal, BrokerUnavailable) as err:
        # covey's own error keeps the broker's as its context (raised `from None`).
        cause = err if isinstance(err, refusal) else err.__context__
        if not isinstance(cause, refusal):
            raise
        raise _refuse(
            403, f"RabbitMQ refused {person}'s broker user: {reply_text(cause)}"
        ) from None


# -- reading a body ---------------------------------------------------------------------


M = TypeVar("M", bound="Body")


async def read_body(request: Request, model: type[M], limit: int) -> M:
    """The request's JSON body as `model`: 415 for another content type, 413 past
    `limit` bytes, 400 naming the first problem. No body at all is `{}`."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _refuse(413, f"the request is over {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raw = b"{}"
    else:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise _refuse(415, "send the body as JSON (Content-Type: application/json)")
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        field, problem = first_problem(err)
        raise BadInput(f"{field}: {problem}" if field else problem) from None


# -- the paths --------------------------------------------------------------------------


def routes(namespace: Namespace) -> list[BaseRoute]:
    """The session and action paths over `namespace`."""
    guard = Guard(namespace)
    people = People(namespace)

    def limit() -> int:
        return namespace.settings.max_body_bytes * 2 + MAX_REQUEST_BYTES_OVER_BODY

    async def session(request: Request) -> Response:
        signed = guard.signed(request)
        return _json(SessionView(person=str(signed.person), csrf=guard.csrf(signed.token)))

    async def sign_in(request: Request) -> Response:
        same_origin(request)
        token = (await read_body(request, SessionBody, limit())).token.strip()
        person = guard.person_of(token)
        answer = _json(SessionView(person=str(person), csrf=guard.csrf(token)))
        answer.set_cookie(COOKIE, token, max_age=COOKIE_MAX_AGE, **_cookie_flags(request))
        return answer

    async def sign_out(request: Request) -> Response:
        same_origin(request)
        answer = Response(status_code=204)
        answer.delete_cookie(COOKIE, **_cookie_flags(request))
        return answer

    async def stop(request: Request) -> Response:
        from coordinator.stopping import request_stop

        signed = guard.acting(request)
        body = await read_body(request, StopBody, limit())
        theirs = await people.namespace_for(signed.person)
        run = request.path_params["run_id"]
        try:
            with broker_decides(signed.person):
                log.info("stop asked", by=str(signed.person), run=run)
                finished = await request_stop(theirs, run, str(signed.person), body.reason)
        except CoveyError as err:
            if type(err) is CoveyError and err.exit_code == ExitCode.FAILED:
                raise _refuse(504, str(err)) from None  # asked, and it has not ended yet
            raise
        return JSONResponse(finished.model_dump(mode="json", exclude_none=True))

    async def request_run(request: Request) -> Response:
        signed = guard.acting(request)
        await read_body(request, Body, limit())  # none expected; anything in it is refused
        theirs = await people.namespace_for(signed.person)
        agent = request.path_params["name"]
        roster = theirs.roster
        if agent not in roster.agents and agent not in roster.broken:  # a broken one: 400
            known = ", ".join(sorted(roster.agents)) or "none"
            raise NotFound(f"no agent {printable(agent)!r} in the roster (known: {known})")
        try:
            with broker_decides(signed.person):
                log.info("run requested", by=str(signed.person), agent=agent)
                await theirs.request_run(agent, requested_by=str(signed.person))
        except NoRecipient as err:
            raise _refuse(409, str(err)) from None
        view = RunRequestedView(agent=agent, requested_by=str(signed.person))
        return _json(view, 202)

    async def mail(request: Request) -> Response:
        signed = guard.acting(request)
        body = await read_body(request, MailBody, limit())
        theirs = await people.namespace_for(signed.person)
        handle = theirs.handle(str(signed.person))
        try:
            with broker_decides(signed.person):
                envelope = await handle.send(body.to, body.subject, body.body)
                log.info("mail sent", by=str(signed.person), to=body.to, id=envelope.id)
        finally:
            await handle.close()
        return _json(MailSentView(id=envelope.id))

    return [
        _route("/api/session", GET=session, POST=sign_in, DELETE=sign_out),
        _route("/api/session/end", POST=sign_out),
        _route("/api/runs/{run_id}/stop", POST=stop),
        _route("/api/agents/{name}/run", POST=request_run),
        _route("/api/mail", POST=mail),
    ]


def _route(path: str, **methods: Handler) -> Route:
    """A path answering `methods` only: any other is 405 (here, rather than the page's
    static files, which would answer a GET on an action path with 404)."""

    async def endpoint(request: Request) -> Response:
        handler = methods.get(request.method)
        if handler is None:
            raise HTTPException(405, headers={"Allow": ", ".join(methods)})
        return await handler(request)

    # Every method routed here (a function's Route would take GET alone by default).
    return Route(path, endpoint, methods=HTTP_METHODS)


def _cookie_flags(request: Request) -> dict[str, Any]:
    # Secure when the browser came over https (uvicorn takes X-Forwarded-Proto from a
    # proxy on loopback): a cookie set over TLS must never travel without it.
    secure = request.url.scheme == "https"
    return {"path": "/", "httponly": True, "samesite": "strict", "secure": secure}


def _json(view: api.View, status: int = 200) -> JSONResponse:
    return JSONResponse(view.model_dump(mode="json"), status)


# -- the OpenAPI document ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Operation:
    path: str
    method: str
    operation_id: str
    summary: str
    answer: type[BaseModel] | None
    status: int = 200
    body: type[Body] | None = None
    errors: tuple[int, ...] = ()
    path_params: tuple[str, ...] = ()


_ACTING = (400, 401, 403, 413, 415, 503)  # every action may answer these
OPERATIONS = (
    Operation("/api/session", "get", "session", "who is signed in, and their CSRF token",
              SessionView, errors=(401,)),
    Operation("/api/session", "post", "sign_in",
              "sign in with a web token: sets the session cookie", SessionView,
              body=SessionBody, errors=(400, 401, 403, 413, 415)),
    Operation("/api/session", "delete", "sign_out", "sign out: clears the cookie", None, 204,
              errors=(403,)),
    Operation("/api/session/end", "post", "end_session", "sign out: clears the cookie", None,
              204, errors=(403,)),
    Operation("/api/runs/{run_id}/stop", "post", "stop_run",
              "stop a live run (or an agent's live run), as the signed-in person; answers "
              "its run.finished once it has ended", Event, body=StopBody,
              errors=(*_ACTING, 404, 409, 504), path_params=("run_id",)),
    Operation("/api/agents/{name}/run", "post", "request_run",
              "ask a supervisor to run the agent now, as the signed-in person",
              RunRequestedView, 202, errors=(*_ACTING, 404, 409), path_params=("name",)),
    Operation("/api/mail", "post", "send_mail", "send mail as the signed-in person",
              MailSentView, body=MailBody, errors=(*_ACTING, 404)),
)  # fmt: skip

_MEANINGS = {
    400: "bad input",
    401: "no valid web token (Authorization: Bearer, or the session cookie)",
    403: "another origin, a missing or wrong X-CSRF-Token with the cookie, or the broker "
    "refused the person's user",
    404: "no such run, agent or recipient",
    409: "nothing to stop, or no supervisor listens for run requests",
    413: "the body is too large",
    415: "the body is not JSON",
    503: "the broker cannot be reached",
    504: "asked to stop; the run has not ended yet",
}


def openapi_paths(schemas: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI paths of the session and the actions; their models added to `schemas`."""

    def ref(model: type[BaseModel], mode: Any) -> dict[str, Any]:
        schema = TypeAdapter(model).json_schema(
            ref_template="#/components/schemas/{model}", mode=mode
        )
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"$ref": "#/components/schemas/ErrorView"}
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        responses: dict[str, Any] = {
            str(code): {
                "description": _MEANINGS[code],
                "content": {"application/json": {"schema": error}},
            }
            for code in sorted(set(op.errors))
        }
        if op.answer is None:
            responses[str(op.status)] = {"description": "done"}
        else:
            content = {"application/json": {"schema": ref(op.answer, "serialization")}}
            responses[str(op.status)] = {"description": "done", "content": content}
        operation: dict[str, Any] = {
            "summary": op.summary,
            "operationId": op.operation_id,
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in op.path_params
            ],
            "responses": dict(sorted(responses.items())),
        }
        if op.body is not None:
            operation["requestBody"] = {
                "required": op.body is not StopBody,
                "content": {"application/json": {"schema": ref(op.body, "validation")}},
            }
        paths.setdefault(op.path, {})[op.method] = operation
    return paths
