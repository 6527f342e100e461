"""The gateway: the one module that opens connections and channels to RabbitMQ, and
the one that creates exchanges, queues and bindings on them.

A `Gateway` is one AMQP connection. Everything else in covey asks it for what it
needs — a channel for one operation (`async with gateway.operation_channel() as ch`), a
confirmed publish, an existing queue and its ready count, a note, a listener — and no
other module opens a channel. Errors from aio-pika and aiormq are translated here into
covey's own (`translated`), with one line that names the problem and the fix.

Who declares what: topology.py describes the lasting topology as data and declares
nothing; `Gateway.apply` declares such a description (which part, and when, is the
namespace's call: `Namespace.apply_topology`, `ensure_participants`). What comes and
goes is declared here as it is needed, never described there: a note's queue on its
first write (`publish_notes`), a lock slot (`take_exclusive`), and a listener's own
queue (`listen`).

Publishing is always confirmed, and `mandatory` unless the caller says otherwise (most
events: see `publish_event`): a publish returns only once the broker has taken
responsibility for the message, and raises when it did not. Every publish is signed:
its `user_id` is the connection's own user, which RabbitMQ checks, so a reader can
trust it (see `identity.py`). Envelopes become AMQP messages here (and back), so the
rest of covey never handles AMQP properties itself.

Reconnecting, the one policy: a gateway made with `reconnects=True` (a
participant's, a daemon's) replaces a connection the broker dropped the next time
it publishes; a lock's gateway never does, since its locks die with its
connection and a new one would hold nothing (see lock.py). A daemon that must
keep a subscription re-opens a whole gateway, every `RECONNECT_SECONDS`. Every
connection, first or again, comes from `open_connection`, which tries the broker's
nodes (`amqp_urls`) in turn, the node of a connection just lost last: so a client
whose node went away lands on another.

Reading a stream is the one thing a gateway may do on another connection: a node
without a running replica of a stream refuses its consumers, so `consume_stream` reads
it through a node that has one, on a connection the gateway keeps for that stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import ssl
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from datetime import datetime, timedelta
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from yarl import URL

from coordinator import aiormq_fix
from coordinator.envelope import MESSAGE_TYPE, Envelope, now
from coordinator.errors import (
    BrokerUnavailable,
    ConfigError,
    CoveyError,
    NoRecipient,
    TopologyMissing,
)
from coordinator.events import EVENT_TYPE, Event
from coordinator.identity import url_user
from coordinator.session import (
    COUNT_HEADER,
    FIRST_SEQ_HEADER,
    RUN_HEADER,
    SESSION_TYPE,
    SessionBatch,
)
from coordinator.settings import Settings
from coordinator.topology import (
    DEAD,
    EVENTS_EXCHANGE,
    MAIL_EXCHANGE,
    NOTES_EXCHANGE,
    SESSIONS,
    BindingSpec,
    ExchangeSpec,
    QueueSpec,
    StreamSpec,
    Topology,
)

T = TypeVar("T")

aiormq_fix.apply()  # a channel the broker closes is always answered: see aiormq_fix.py

# The headers of covey's copy of a dead letter. They are the dead-letterer's word, not
# the broker's: dead.py says when `x-covey-user-id` is believed, and why.
REASON_HEADER = "x-covey-reason"
DETAIL_HEADER = "x-covey-detail"
QUEUE_HEADER = "x-covey-queue"
DEAD_AT_HEADER = "x-covey-dead-at"
USER_HEADER = "x-covey-user-id"  # who published a letter covey dead-lettered (replay keeps it)
COVEY_HEADERS = (REASON_HEADER, DETAIL_HEADER, QUEUE_HEADER, DEAD_AT_HEADER, USER_HEADER)
NOTE_ATTEMPTS = 20
NOTE_RETRY_SECONDS = 0.01
# Exclusive queues (lock slots, listeners) say they are classic: a node or vhost whose
# default queue type is quorum (deploy/rabbitmq.conf sets one) must not make them
# quorum queues, which cannot be exclusive. An exclusive queue lives on its
# connection's node and dies with the connection, which is the point of a lock.
EXCLUSIVE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "classic"}
# A note is a quorum queue of a few versioned copies: see Gateway.write_note.
NOTE_VERSION_HEADER = "x-covey-version"  # which of a note's copies is the newest
LEGACY_VERSION = -1  # a copy written before versions (a classic note: only ever one)
NOTE_COPIES = 8  # a bound on the copies, should nobody read a note for a long time
NOTE_DELIVERY_LIMIT = 2**31 - 1  # every peek is a delivery: never drop a note for it
# While the broker is away, a daemon tries it again this often: work should resume within
# a second or two of it answering, a refused connect is cheap, and the outage is logged
# once, not per attempt.
RECONNECT_SECONDS = 0.5
DROP_SECONDS = 1.0  # closing a publisher channel that left a publish unconfirmed
StreamOffset = int | str | datetime  # x-stream-offset: an offset, first/last/next, a time
OnMessage = Callable[[AbstractIncomingMessage], Awaitable[Any]]


class _ReportedByCovey(logging.Filter):
    """Drops aiormq's own line for a node that does not answer: open_connection tries
    the next node, and reports (once, in one line) only when none answers. Without this
    a program using covey, with no logging of its own, would print a line on stderr for
    each dead node even when the next one took the connection."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error when creating transport")


logging.getLogger("aiormq.connection").addFilter(_ReportedByCovey())

# What aio-pika and aiormq raise when the broker, the connection or a channel went
# away (or refused an operation); `translated` turns each into a covey error.
BROKER_ERRORS = (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError)


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn aio-pika's and aiormq's errors inside the block into covey's, each one line
    naming `what` was being done. covey's own errors pass through unchanged."""
    try:
        yield
    except CoveyError:
        raise
    except aiormq.exceptions.ChannelNotFoundEntity as err:
        if starting(err):
            raise BrokerUnavailable(
                f"cannot {what}: its RabbitMQ node is down or still starting; retry in a moment"
            ) from None
        raise TopologyMissing(
            f"cannot {what}: {reply_text(err)}; run `covey topology apply`"
        ) from None
    except aiormq.exceptions.ChannelAccessRefused as err:
        raise BrokerUnavailable(
            f"RabbitMQ refused to {what} ({reply_text(err)}): this user lacks the permission"
        ) from None
    except TimeoutError:
        raise BrokerUnavailable(f"RabbitMQ did not answer in time to {what}") from None
    except BROKER_ERRORS as err:
        raise BrokerUnavailable(f"lost RabbitMQ while trying to {what} ({err})") from None


def reply_text(err: BaseException) -> str:
    """The broker's reply text of a channel error, without aiormq's tuple around it."""
    args = err.args[0] if err.args else err
    return str(args[1] if isinstance(args, tuple) and len(args) > 1 else args)


def redacted(url: str) -> str:
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


def signer(connection: AbstractConnection) -> str:
    """The user a connection logged in as: the `user_id` RabbitMQ lets it publish with."""
    # aio-pika's Connection has `url`; its abstract interface does not declare it.
    return url_user(str(getattr(connection, "url", "")))


def mail_properties(envelope: Envelope, user_id: str) -> aiormq.spec.Basic.Properties:
    """A mail message's AMQP properties, built directly: the same aio-pika's Message would
    give (tests/test_properties.py compares them) without the Message, which cost a send
    about 9 of its ~155 microseconds of CPU."""
    expiration: str | None = None
    if envelope.expires_at is not None:
        # A message that is already due still needs a positive TTL to be accepted;
        # the broker then dead-letters it at once as `expired`.
        left = max(envelope.expires_at - now(), timedelta(milliseconds=1))
        expiration = str(int(left.total_seconds() * 1000))
    return aiormq.spec.Basic.Properties(
        content_type="application/json",
        message_type=MESSAGE_TYPE,
        message_id=envelope.id,
        timestamp=envelope.created_at,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        expiration=expiration,
        app_id="covey",
        user_id=user_id,
        headers={},
        priority=0,
    )


def session_message(batch: SessionBatch, user_id: str) -> aio_pika.Message:
    """A batch of one run's consecutive events as one stream message: its run in a header,
    so that a reader skips other runs' messages without parsing them, and the seqs it
    carries (the first, and how many) in two more."""
    return aio_pika.Message(
        body=batch.body,
        content_type="application/json",
        type=SESSION_TYPE,
        headers={
            RUN_HEADER: batch.run_id,
            FIRST_SEQ_HEADER: batch.first_seq,
            COUNT_HEADER: batch.count,
        },
        timestamp=batch.at,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        app_id="covey",
        user_id=user_id,
    )


async def open_connection(
    settings: Settings, name: str, heartbeat: int | None = None, avoid: str | None = None
) -> AbstractConnection:
    """A plain (not self-reconnecting) connection to the first of the broker's nodes that
    answers, tried in `amqp_order`, or BrokerUnavailable in one line.

    `connect_timeout` bounds the whole; each node gets an equal share of what is left,
    so a node that swallows packets (a host that is off) cannot use up the time of the
    nodes after it. A node that does not answer is no error while another does. A
    refused login ends the search at once: a cluster's nodes share their users, so
    every node would refuse it too (and each refusal is logged against the user).
    `avoid` (the URL of a connection just lost) is tried last, so a reconnect lands on
    another node while its own is going down."""
    urls = ordered(settings, avoid)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.connect_timeout
    failures: list[tuple[str, _NodeFailed]] = []
    for index, url in enumerate(urls):
        share = max(deadline - loop.time(), 0.0) / (len(urls) - index)
        try:
            return await _connect_to(url, settings, name, heartbeat, share)
        except _NodeFailed as failed:
            failures.append((url, failed))
    if len(failures) == 1:
        raise BrokerUnavailable(str(failures[0][1]))  # one node: as it always was
    unreachable = [(url, e) for url, e in failures if isinstance(e, _Unreachable)]
    if len(unreachable) < len(failures):  # a node answered, but not with a connection
        first = next(e for _, e in failures if not isinstance(e, _Unreachable))
        raise BrokerUnavailable(
            f"{first}; {len(failures) - 1} other node(s) did not take the connection either"
        )
    nodes = ", ".join(redacted(url) for url, _ in failures)
    reasons = "; ".join(f"{_place(url)}: {e.reason}" for url, e in unreachable)
    raise BrokerUnavailable(
        f"cannot reach RabbitMQ at any of {nodes} ({reasons}): start one, or point "
        "COVEY_AMQP_URLS at running nodes"
    )


def ordered(settings: Settings, avoid: str | None = None) -> list[str]:
    """The nodes' URLs in the order to try them: `amqp_order`, then `avoid`'s node last."""
    urls = list(settings.broker_urls)
    if settings.amqp_order == "shuffle":
        random.shuffle(urls)
    if avoid is not None:
        lost = _place(avoid)
        urls.sort(key=lambda url: _place(url) == lost)  # stable: the rest keep their order
    return urls


def _place(url: str) -> str:
    """A URL's host:port, which names its node."""
    parsed = URL(url)
    return f"{parsed.host}:{parsed.port}"


class _NodeFailed(BrokerUnavailable):
    """One node did not give a connection, for a reason another node may not share."""


class _Unreachable(_NodeFailed):
    """Nothing answered at one node (refused, timed out, reset); `reason` says which."""

    def __init__(self, line: str, reason: str) -> None:
        super().__init__(line)
        self.reason = reason


def _why(err: BaseException, timeout: float) -> str:
    """A few words for why a node did not answer ("Connection refused")."""
    code = err.errno if isinstance(err, OSError) else err.args[0] if err.args else None
    if isinstance(code, int):
        return os.strerror(code)
    return str(err) or f"no answer in {timeout:.1f} s"


async def _connect_to(
    amqp_url: str, settings: Settings, name: str, heartbeat: int | None, timeout: float
) -> AbstractConnection:
    """A connection to one node; _NodeFailed when it fails there only, BrokerUnavailable
    when it would fail everywhere (the login), ConfigError for unusable TLS files."""
    url = URL(amqp_url)
    if heartbeat is not None:
        url = url.update_query(heartbeat=heartbeat)
    shown = redacted(amqp_url)
    context = tls_context(settings) if url.scheme == "amqps" else None
    try:
        async with asyncio.timeout(timeout):
            return await aio_pika.connect(  # no `timeout=`: asyncio's, as for `_confirmed`
                url,
                client_properties={"connection_name": name},
                ssl_context=context,
            )
    except aiormq.exceptions.ProbableAuthenticationError:
        raise BrokerUnavailable(
            f"RabbitMQ at {shown} refused the login: check the user and password in COVEY_AMQP_URL"
        ) from None
    except aiormq.exceptions.ProtocolSyntaxError:
        # Not the login: a vhost can be down on one node only, so the next may take it.
        raise _NodeFailed(
            f"RabbitMQ at {shown} refused to open the connection: check that the vhost "
            "in COVEY_AMQP_URL exists and the user may use it"
        ) from None
    except (OSError, TimeoutError, aiormq.exceptions.AMQPError) as err:
        tls = err if isinstance(err, ssl.SSLError) else err.__cause__  # aiormq wraps it
        if isinstance(tls, ssl.SSLError):
            why = tls.verify_message if isinstance(tls, ssl.SSLCertVerificationError) else None
            raise _NodeFailed(
                f"TLS with RabbitMQ at {shown} failed ({why or tls.reason}): "
                "set tls_ca to the CA that signed the broker's certificate (and tls_cert, "
                "tls_key where it asks for a client certificate)"
            ) from None
        raise _Unreachable(
            f"cannot reach RabbitMQ at {shown} ({str(err) or _why(err, timeout)}): start it, or "
            "point COVEY_AMQP_URL at one",
            _why(err, timeout),
        ) from None


def tls_context(settings: Settings) -> ssl.SSLContext:
    """Verify the broker against `tls_ca` (else the system's CAs); present `tls_cert`."""
    try:
        context = ssl.create_default_context(cafile=settings.tls_ca)
        if settings.tls_cert is not None:
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"cannot load the TLS files (tls_ca, tls_cert, tls_key): {err}; check the paths"
        ) from None
    return context


def copy_of(
    message: AbstractIncomingMessage, headers: dict[str, Any], user_id: str | None
) -> aio_pika.Message:
    """A persistent copy of a delivery, with these headers instead of its own, signed by
    `user_id` (the publishing connection's user, or one it may impersonate)."""
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        type=message.type,
        message_id=message.message_id,
        timestamp=message.timestamp,
        app_id=message.app_id,
        user_id=user_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


class Gateway:
    """One AMQP connection, and every channel covey opens on it (and, for a stream its
    node has no replica of, one to a node that has: `consume_stream`). Use `async with`."""

    def __init__(
        self,
        connection: AbstractConnection,
        settings: Settings,
        name: str,
        reconnects: bool = True,
    ) -> None:
        self._connection = connection
        self._settings = settings
        self._name = name
        self._reconnects = reconnects
        self._publisher: AbstractChannel | None = None
        self._publisher_opening = asyncio.Lock()  # concurrent first publishes share one channel
        # Streams this connection's node holds no replica of, each read through a
        # connection to a node that has one (see consume_stream); closed with the gateway.
        self._stream_connections: dict[str, AbstractConnection] = {}
        self._stream_finding = asyncio.Lock()  # concurrent readers share one search
        self.user = signer(connection)

    @classmethod
    async def connect(
        cls,
        settings: Settings,
        name: str = "covey",
        *,
        heartbeat: int | None = None,
        reconnects: bool = True,
        avoid: str | None = None,
    ) -> Gateway:
        """Connect to one of the broker's nodes (`avoid`'s last: see open_connection), or
        raise BrokerUnavailable with one line saying why and what to do."""
        connection = await open_connection(settings, name, heartbeat, avoid)
        return cls(connection, settings, name, reconnects)

    @property
    def connection(self) -> AbstractConnection:
        """The connection itself, for what aio-pika hands out on it (queues, messages);
        open channels with `operation_channel()` or `open_channel()`, not on this."""
        return self._connection

    @property
    def url(self) -> str:
        """The URL of the node this gateway is connected to (password included)."""
        return _url_of(self._connection)

    @property
    def alive(self) -> bool:
        """Whether the connection is still up (see `_open`)."""
        return _open(self._connection)

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the connection closes, whoever closed it."""
        self._connection.close_callbacks.add(lambda *_: callback())

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        others, self._stream_connections = self._stream_connections, {}
        for connection in others.values():
            if not connection.is_closed:
                with contextlib.suppress(*BROKER_ERRORS):
                    await connection.close()
        if not self._connection.is_closed:
            await self._connection.close()

    # -- channels ------------------------------------------------------------

    async def open_channel(
        self, *, confirms: bool = False, prefetch: int | None = None
    ) -> AbstractChannel:
        """A channel the caller keeps (a consumer's, a lock's) and closes itself.
        With `confirms`, publishes on it wait for the broker's confirm and raise
        when a `mandatory` one is returned unrouted."""
        return await _channel(self._connection, confirms, prefetch)

    @contextlib.asynccontextmanager
    async def operation_channel(
        self, *, confirms: bool = False, prefetch: int | None = None
    ) -> AsyncIterator[AbstractChannel]:
        """A channel for one operation, closed after it (if the broker has not closed
        it already: a failed passive declare or a refused publish closes its channel)."""
        channel = await self.open_channel(confirms=confirms, prefetch=prefetch)
        try:
            yield channel
        finally:
            if not channel.is_closed:
                await channel.close()

    # -- topology ------------------------------------------------------------

    async def apply(self, topology: Topology, parallelism: int = 8) -> None:
        """Declare `topology` idempotently, spread over `parallelism` channels.

        One AMQP channel runs one method at a time, so a large roster declares
        much faster over several channels than down one; a small topology is not
        worth the extra channels. Each queue is bound as soon as it is declared,
        so that binding overlaps the broker's (slow) creation of other queues.
        """
        count = max(1, min(parallelism, len(topology.bindings) // 16))
        channels = await asyncio.gather(*(self.open_channel() for _ in range(count)))
        bindings: dict[str, list[BindingSpec]] = {}
        for binding in topology.bindings:
            bindings.setdefault(binding.queue, []).append(binding)

        async def declare_and_bind(channel: AbstractChannel, spec: QueueSpec | StreamSpec) -> None:
            await _declare_queue(channel, spec)
            for binding in bindings.get(spec.name, ()):
                await _declare_binding(channel, binding)

        declared = {spec.name for spec in topology.queues}
        elsewhere = [b for b in topology.bindings if b.queue not in declared]
        try:
            # Exchanges first: a binding needs both ends to exist.
            await spread(channels, topology.exchanges, _declare_exchange)
            await spread(channels, topology.queues, declare_and_bind)
            await spread(channels, elsewhere, _declare_binding)
        except ExceptionGroup as group:  # the TaskGroup in spread: report the first
            raise _declare_error(group.exceptions[0]) from None
        finally:
            for channel in channels:
                if not channel.is_closed:
                    await channel.close()

    async def purge(self, queues: Iterable[str]) -> None:
        """Empty queues; their messages are gone for good."""
        async with self.operation_channel() as channel:
            for name in queues:
                await (await channel.get_queue(name, ensure=False)).purge()

    # -- publishing ----------------------------------------------------------

    async def _publish_channel(self) -> AbstractChannel:
        if self._publisher is not None and not self._publisher.is_closed:
            return self._publisher  # every publish's path: no lock to take
        async with self._publisher_opening:
            if self._publisher is not None and not self._publisher.is_closed:
                return self._publisher
            try:
                self._publisher = await self.open_channel(confirms=True)
            except BROKER_ERRORS:
                if not self._reconnects:
                    raise
                # Publishing is safe to retry on a new connection (unlike holding a
                # lock), so a long run can still record how it ended after a hiccup.
                lost = self.url
                self._connection = await open_connection(self._settings, self._name, avoid=lost)
                self._publisher = await self.open_channel(confirms=True)
            return self._publisher

    async def _drop_publisher(self) -> None:
        """Close the publisher channel (a bounded wait: a broker that did not confirm may
        not answer this either); the next publish opens another."""
        channel, self._publisher = self._publisher, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(TimeoutError, *BROKER_ERRORS):
                async with asyncio.timeout(DROP_SECONDS):
                    await channel.close()

    async def publish_message(
        self,
        exchange: str,
        message: aio_pika.Message,
        routing_key: str,
        what: str,
        *,
        mandatory: bool = True,
        timeout: float | None = None,
    ) -> None:
        """Publish `message` (described as `what` in errors) and wait for the confirm.
        A `mandatory` message no queue takes raises NoRecipient."""
        await self._publish(
            exchange, routing_key, message.body, message.properties, what, mandatory, timeout
        )

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: aiormq.spec.Basic.Properties,
        what: str,
        mandatory: bool,
        timeout: float | None,
    ) -> None:
        """Every publish's way out: aiormq's publish on the publisher channel, which is
        what aio-pika's Exchange.publish calls once it has an aio-pika Message's
        properties (mail has its own: `mail_properties`)."""
        channel = await self._publish_channel()

        async def publishing() -> object:
            underlay = await channel.get_underlay_channel()  # raises if it has just closed
            return await underlay.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
            )

        await self._confirmed(publishing(), what, timeout)

    async def publish_session(self, batch: SessionBatch, timeout: float | None = None) -> None:
        """Publish a batch of a run's consecutive session events to `covey.sessions` as one
        message (see session.py), and wait up to `timeout` seconds for its confirm.

        Raises as `publish_message` does when it was not confirmed (a timeout included:
        the next publish then starts on a fresh channel); the caller then publishes the
        batch again, so its events may land twice (their `seq`s tell a repeat from a new
        one, and readers pass repeats by)."""
        message = session_message(batch, self.user)
        await self.publish_message(
            SESSIONS, message, "", f"session events of run {batch.run_id}", timeout=timeout
        )

    async def publish(self, envelope: Envelope, timeout: float | None = None) -> None:
        """Publish to the recipient's routing key; return once the broker confirmed."""
        await self._publish(
            MAIL_EXCHANGE,
            envelope.recipient_address.routing_key,
            envelope.to_json(),
            mail_properties(envelope, self.user),
            f"message {envelope.id} to {envelope.recipient}",
            True,
            timeout,
        )

    async def publish_event(self, event: Event, mandatory: bool = False) -> None:
        """Publish a control event to `covey.events`, confirmed. Most events are not
        `mandatory` (a dashboard may or may not be listening); a request is, since
        nobody taking it is worth an error."""
        message = aio_pika.Message(
            body=event.model_dump_json(exclude_none=True).encode(),
            content_type="application/json",
            type=EVENT_TYPE,
            timestamp=event.at,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            app_id="covey",
            user_id=self.user,
        )
        await self.publish_message(
            EVENTS_EXCHANGE,
            message,
            event.routing_key,
            event.kind,
            mandatory=mandatory,
            timeout=self._settings.connect_timeout,
        )

    async def dead_letter(
        self, message: AbstractIncomingMessage, queue: str, reason: str, detail: str
    ) -> None:
        """Copy a delivery to `covey.dead` with why it is there; confirmed before returning.

        The caller acks the original only after this returns, so the delivery is
        never lost; a crash between the two leaves a duplicate dead letter, never none.
        """
        # Whatever covey headers the sender wrote go: a letter "signed by ada" in its
        # own headers must not come out of here as ada's.
        headers = {k: v for k, v in (message.headers or {}).items() if k not in COVEY_HEADERS}
        headers.update(
            {
                REASON_HEADER: reason,
                DETAIL_HEADER: detail[:1000],
                QUEUE_HEADER: queue,
                DEAD_AT_HEADER: now().isoformat(),
            }
        )
        if message.user_id:  # the copy is signed by this reader; keep who signed the original
            headers[USER_HEADER] = message.user_id
        await self.publish_message(
            DEAD,
            copy_of(message, headers, user_id=self.user),
            message.routing_key or "",
            f"dead letter for {message.message_id or 'a delivery'}",
            timeout=self._settings.connect_timeout,
        )

    async def _confirmed(self, publishing: Awaitable[T], what: str, timeout: float | None) -> T:
        # The timeout is asyncio's, not aio-pika's `timeout=`, which aiormq's versions
        # wait out differently (older ones with asyncio.wait_for, which on Python 3.11 can
        # lose a cancel that comes as the confirm does: CPython gh-86296); this one keeps
        # it with any version, and a cancelled sender must stop.
        try:
            async with asyncio.timeout(timeout):
                return await publishing
        except aio_pika.exceptions.DeliveryError as err:
            if isinstance(err.frame, aiormq.spec.Basic.Return):
                raise NoRecipient(f"no queue takes {what}") from None
            raise BrokerUnavailable(f"RabbitMQ refused {what} ({err})") from None
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise TopologyMissing(
                f"cannot publish {what}: covey's exchanges do not exist here; run "
                "`covey topology apply`"
            ) from None
        except TimeoutError:
            # The next publish starts on a fresh channel. A channel whose publish was
            # never confirmed cannot be trusted with the next one: on a cluster (3.10), a
            # stream publish in flight when the stream's leader stopped is never
            # confirmed, and one after it on the same channel was confirmed, not stored.
            await self._drop_publisher()
            raise BrokerUnavailable(
                f"RabbitMQ did not confirm {what} in time: it may be blocking publishers "
                "(memory or disk alarm), or a replica leader may have just gone; treat it "
                "as not sent"
            ) from None
        except BROKER_ERRORS as err:
            self._publisher = None  # the next publish starts on a fresh channel, or connection
            raise BrokerUnavailable(f"lost RabbitMQ while publishing {what} ({err})") from None

    # -- queues --------------------------------------------------------------

    async def queue(self, name: str, channel: AbstractChannel | None = None) -> AbstractQueue:
        """An existing queue, on `channel` or on a channel of its own (the caller closes
        `queue.channel`).

        Its `declaration_result.message_count` says how many messages are ready.
        Raises TopologyMissing when the queue does not exist.
        """
        try:
            if channel is None:
                return await self.existing_queue(name)
            return await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity as err:
            if starting(err):  # on the caller's channel, which it has just lost: no retry
                raise BrokerUnavailable(
                    f"queue {name} is not available: its RabbitMQ node is down or still "
                    "starting; retry in a moment"
                ) from None
            raise TopologyMissing(
                f"queue {name} does not exist; run `covey topology apply`"
            ) from None

    async def existing_queue(
        self,
        name: str,
        prefetch: int | None = None,
        connection: AbstractConnection | None = None,
    ) -> AbstractQueue:
        """Passively declare `name` on a channel of its own (the caller closes
        `queue.channel`), waiting out a node that is still starting. Raises
        ChannelNotFoundEntity when the queue does not exist (each caller says what that
        means), BrokerUnavailable when it stays unavailable past STARTING_SECONDS.
        `connection`: another than the gateway's own (a stream reader's: consume_stream)."""
        deadline = asyncio.get_running_loop().time() + STARTING_SECONDS
        while True:
            channel = await _channel(connection or self._connection, False, prefetch)
            try:
                return await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity as err:
                if not starting(err):
                    raise
                if asyncio.get_running_loop().time() > deadline:
                    raise BrokerUnavailable(
                        f"{name} is not available: its RabbitMQ node is down or still "
                        "starting (the queue itself exists); check the broker, then retry"
                    ) from None
            await asyncio.sleep(STARTING_POLL_SECONDS)

    async def exists(self, name: str) -> bool:
        """Whether a queue named `name` exists (one held exclusively by another
        connection exists too: use `held` to tell)."""
        async with self.operation_channel() as channel:
            try:
                await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False
            except aiormq.exceptions.ChannelLockedResource:
                return True
        return True

    async def held(self, name: str) -> bool | None:
        """For an exclusive queue (a lock slot): whether it exists (None: it does not),
        and if so whether another connection holds it (True) or this one (False)."""
        async with self.operation_channel() as channel:
            try:
                await channel.declare_queue(name, passive=True)  # succeeds only for our own
            except aiormq.exceptions.ChannelNotFoundEntity:
                return None
            except aiormq.exceptions.ChannelLockedResource:
                return True
        return False

    async def take_exclusive(self, name: str, channel: AbstractChannel | None = None) -> bool:
        """Declare `name` as an exclusive queue of this connection: True if that made it
        ours, False if another connection holds it. It lives as long as the connection.
        On the caller's `channel` when given (a refusal closes it: the caller reopens it),
        else on one of its own."""
        if channel is None:
            async with self.operation_channel() as own:
                return await self.take_exclusive(name, own)
        try:
            await channel.declare_queue(
                name, exclusive=True, durable=False, arguments=EXCLUSIVE_ARGUMENTS
            )
        except aiormq.exceptions.ChannelLockedResource:
            return False
        return True

    async def ready_counts(
        self, names: Sequence[str], parallelism: int = 8
    ) -> dict[str, int | None]:
        """How many messages wait in each queue (None for a queue that does not exist),
        by passive declares over up to `parallelism` channels."""
        counts: dict[str, int | None] = {}

        async def count(_: int, share: Sequence[str]) -> None:
            channel = await self.open_channel()
            try:
                for name in share:
                    if channel.is_closed:  # a missing queue closed it
                        channel = await self.open_channel()
                    try:
                        declared = await channel.declare_queue(name, passive=True)
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        counts[name] = None
                        continue
                    counts[name] = declared.declaration_result.message_count or 0
            finally:
                if not channel.is_closed:
                    await channel.close()

        await in_parallel(names, parallelism, count)
        return counts

    # -- reading streams ------------------------------------------------------
    # RabbitMQ serves a stream consumer only on a node that runs a replica of the stream,
    # and refuses it on any other (PRECONDITION_FAILED "... does not have a replica on
    # the local node"): a stream with fewer replicas than the cluster has nodes
    # (`replicas`), or a node whose replica is down or still starting. So the consumer
    # goes where a replica is: this connection's node when it has one, else the next
    # node in `amqp_order` that has, on a connection the gateway keeps for that stream.

    async def consume_stream(
        self,
        name: str,
        offset: StreamOffset,
        on_message: OnMessage,
        prefetch: int,
    ) -> AbstractQueue:
        """Consume stream `name` from `offset` (`x-stream-offset`: an offset, `first`,
        `last`, `next` or a time) into `on_message`, on a channel of its own on a node
        that has a replica of it. Returns the queue: closing `queue.channel` (the caller's
        to close) ends the consumer.

        Raises TopologyMissing when the stream does not exist, BrokerUnavailable in one
        line when no node will serve it."""
        kept = self._stream_connections.get(name)
        tried: set[str] = set()
        for connection in (kept, self._connection):
            if connection is None or (connection is kept and not _open(connection)):
                continue
            place = _place(_url_of(connection))
            if place in tried:
                continue
            tried.add(place)
            try:
                return await _consume_on(self, connection, name, offset, on_message, prefetch)
            except aiormq.exceptions.ChannelPreconditionFailed as err:
                if not no_local_replica(err):
                    raise
        async with self._stream_finding:
            found = self._stream_connections.get(name)
            if found is not None and found is not kept and _open(found):  # another reader's
                try:
                    return await _consume_on(self, found, name, offset, on_message, prefetch)
                except aiormq.exceptions.ChannelPreconditionFailed as err:
                    if not no_local_replica(err):
                        raise
                    tried.add(_place(_url_of(found)))
            return await self._consume_elsewhere(name, offset, on_message, prefetch, tried)

    async def _consume_elsewhere(
        self,
        name: str,
        offset: StreamOffset,
        on_message: OnMessage,
        prefetch: int,
        tried: set[str],
    ) -> AbstractQueue:
        """consume_stream once the nodes in `tried` (host:port) have refused: the other
        nodes in turn, each on a new connection, kept for `name` if its node serves it."""
        candidates = [url for url in ordered(self._settings) if _place(url) not in tried]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.connect_timeout
        for index, url in enumerate(candidates):
            share = max(deadline - loop.time(), 0.0) / (len(candidates) - index)
            try:
                connection = await _connect_to(
                    url, self._settings, f"{self._name} (stream {name})", None, share
                )
            except _NodeFailed:
                continue  # down, or not taking connections: the next may serve it
            try:
                queue = await _consume_on(self, connection, name, offset, on_message, prefetch)
            except BaseException as err:
                with contextlib.suppress(*BROKER_ERRORS):
                    await connection.close()
                if isinstance(err, aiormq.exceptions.ChannelPreconditionFailed) and (
                    no_local_replica(err)
                ):
                    continue
                raise
            old = self._stream_connections.get(name)
            self._stream_connections[name] = connection
            if old is not None and not old.is_closed:
                with contextlib.suppress(*BROKER_ERRORS):
                    await old.close()
            return queue
        raise BrokerUnavailable(
            f"no RabbitMQ node covey can reach runs a replica of stream {name} (a node "
            "without one refuses its readers): start the nodes that hold it "
            "(`rabbitmq-streams stream_status` lists them), or add their URLs to amqp_urls"
        )

    # -- listening ------------------------------------------------------------

    async def listen(
        self,
        channel: AbstractChannel,
        exchange: str,
        keys: Iterable[str],
        on_message: OnMessage,
    ) -> AbstractQueue:
        """Call `on_message` with a copy of each message routed through `exchange` with
        any of `keys`, from now on, on `channel` (the caller's, kept open while it listens).

        The queue is the listener's own: server-named, exclusive and auto-deleted, so it
        goes with the channel or the connection and leaves nothing behind. It is consumed
        without acks: what comes this way is a signal to act on now (a lock released,
        mail routed, a run requested), and one lost with its listener was for nobody.
        """
        queue = await channel.declare_queue(
            exclusive=True, auto_delete=True, arguments=EXCLUSIVE_ARGUMENTS
        )
        for key in keys:
            await queue.bind(exchange, key)
        await queue.consume(on_message, no_ack=True)
        return queue

    # -- notes: small records, newest wins ----------------------------------
    # A small piece of shared state kept on the broker (a lock's fencing token and
    # holder, an agent's changelog cursor): a durable quorum queue, replicated like
    # mail so that it outlives the loss of a node, holding the record. A read is a
    # peek: get, then reject back into the queue.
    #
    # Why every copy carries a version, and a note may hold several copies: on a
    # quorum queue (3.10) a write made while a reader has the only copy out for a peek
    # would be dropped by `x-max-length: 1` with drop-head (the copy out still counts,
    # and the new one is the only one there to drop); the reader then puts the old
    # one back. So a write never replaces anything: it adds a copy carrying its
    # writer's version (a cursor's offset; a lock's fencing token, doubled, plus one
    # once released), a reader takes every copy there, puts the newest back and drops
    # the older ones, and whoever writes under a lock drops what it read once its own
    # copy is confirmed. A copy is dropped only by someone holding a newer one, so the
    # newest is never lost. `x-max-length` (NOTE_COPIES, drop-head: the oldest go)
    # only bounds a note nobody reads; it can bite only if every copy were out with
    # readers at once. Nor may a peek count against a delivery limit: 3.10 has none by
    # default but treats `-1` as "drop at the first return", and RabbitMQ 4 defaults
    # to 20, so notes say a limit no peeking will reach.
    #
    # Notes are written through the `covey.notes` topic exchange, each bound by its
    # own name, not through the default exchange: a user allowed to publish to the
    # default exchange may publish into any queue, whereas topic permissions on
    # `covey.notes` say whose notes a provisioned user may write. Notes made before
    # versions are classic queues of one message, kept as they are (`declare_note`).

    def note(self, body: bytes, version: int) -> aio_pika.Message:
        """A note's copy at `version`, signed by this connection's user."""
        return aio_pika.Message(
            body,
            headers={NOTE_VERSION_HEADER: version},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=self.user,
        )

    def note_spec(self, queue: str) -> QueueSpec:
        return QueueSpec(
            queue,
            {
                "x-quorum-initial-group-size": self._settings.replicas,
                "x-max-length": NOTE_COPIES,
                "x-overflow": "drop-head",
                "x-delivery-limit": NOTE_DELIVERY_LIMIT,
            },
        )

    async def write_note(self, queue: str, body: bytes, version: int) -> None:
        """Add `body` at `version` to the note `queue` (created if need be); confirmed
        before returning."""
        async with self.operation_channel(confirms=True) as channel:
            await self.publish_notes(channel, (queue,), body, version)

    async def publish_notes(
        self, channel: AbstractChannel, queues: Sequence[str], body: bytes, version: int
    ) -> None:
        """Add `body` at `version` to each note in `queues`, at once, on `channel` (which
        has confirms): one confirm round trip when the notes exist; those that do not are
        made first (with the notes exchange, in a namespace nobody has set up), on
        `channel` reopened if a refusal closed it.

        Raises BrokerUnavailable when a copy is not confirmed within `connect_timeout`
        (a quorum queue without a majority confirms nothing), as a broker error."""
        timeout = self._settings.connect_timeout

        def unconfirmed() -> BrokerUnavailable:
            return BrokerUnavailable(
                f"RabbitMQ did not confirm note {', '.join(queues)} within {timeout:g} s: "
                "most of its nodes may be down; retry once they are back"
            )

        exchange = await channel.get_exchange(NOTES_EXCHANGE, ensure=False)
        try:
            async with asyncio.timeout(timeout):  # asyncio's: see `_confirmed`
                writes = await asyncio.gather(
                    *(
                        exchange.publish(self.note(body, version), queue, mandatory=True)
                        for queue in queues
                    ),
                    return_exceptions=True,
                )
        except TimeoutError:
            raise unconfirmed() from None
        # Returned unrouted: no note by that name yet. No exchange: the refusal closed the
        # channel, and the other writes on it failed with it.
        missing = (aio_pika.exceptions.PublishError, aiormq.exceptions.ChannelNotFoundEntity)
        making = any(isinstance(written, missing) for written in writes)
        no_exchange = any(isinstance(w, aiormq.exceptions.ChannelNotFoundEntity) for w in writes)
        for queue, written in zip(queues, writes, strict=True):
            if not isinstance(written, BaseException):
                continue
            if not making:
                raise written
            await self._make_note(channel, queue, no_exchange)
            no_exchange = False
            exchange = await channel.get_exchange(NOTES_EXCHANGE, ensure=False)
            try:
                async with asyncio.timeout(timeout):
                    await exchange.publish(self.note(body, version), queue, mandatory=True)
            except TimeoutError:
                raise unconfirmed() from None

    async def _make_note(self, channel: AbstractChannel, queue: str, no_exchange: bool) -> None:
        """Declare the note `queue` and bind it (after the notes exchange, when there was
        none: the refusal closed `channel`, which is reopened)."""
        if channel.is_closed:
            await channel.reopen()
        if no_exchange:
            await self._declare_notes_exchange()
        await self.declare_note(channel, queue)
        await (await channel.get_queue(queue, ensure=False)).bind(NOTES_EXCHANGE, queue)

    async def declare_note(self, channel: AbstractChannel, queue: str) -> None:
        """Declare the note `queue`, or leave it as it is when it exists with other
        arguments (a classic note from before versions): moving it to a new queue would
        leave a moment with no note at all, in which a lock's next holder would start
        the fencing tokens again from 1, and a digest from the first entry."""
        try:
            await _declare_queue(channel, self.note_spec(queue))
        except aiormq.exceptions.ChannelPreconditionFailed:
            await channel.reopen()  # the refusal closed it; the note is there

    async def _declare_notes_exchange(self) -> None:
        async with self.operation_channel() as channel:
            await channel.declare_exchange(
                NOTES_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
            )

    async def read_note(self, queue: str) -> bytes | None:
        """The newest copy in the note `queue`, left in place; None when there is none
        (or no queue).

        A note is never empty once written, so an empty one means other readers have
        its copies out for their own peeks: try again in a moment rather than answer
        None.
        """
        try:
            notes = await self.existing_queue(queue)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        channel = notes.channel
        try:
            for _ in range(NOTE_ATTEMPTS):
                copies = await take_copies(notes)
                if copies:
                    newest = newest_copy(copies)
                    for copy in copies:
                        if copy is newest:
                            await copy.reject(requeue=True)
                        else:
                            await copy.ack()
                    return newest.body
                await asyncio.sleep(NOTE_RETRY_SECONDS)
            return None  # declared, never written (its writer died between the two)
        finally:
            if not channel.is_closed:
                await channel.close()


def note_version(copy: AbstractIncomingMessage) -> int:
    version = (copy.headers or {}).get(NOTE_VERSION_HEADER)
    return version if isinstance(version, int) else LEGACY_VERSION


def newest_copy(copies: Sequence[AbstractIncomingMessage]) -> AbstractIncomingMessage:
    return max(copies, key=note_version)  # the first of equals


async def take_copies(notes: AbstractQueue) -> list[AbstractIncomingMessage]:
    """Take every copy waiting in the note `notes`, unacknowledged (the caller puts
    back or drops each); [] when none is there. Each get says how many are left."""
    copies: list[AbstractIncomingMessage] = []
    for _ in range(2 * NOTE_COPIES):  # copies written meanwhile can wait for the next read
        try:
            copy = await notes.get(fail=False, no_ack=False)
        except TimeoutError:  # aiormq's own bound on a method: a quorum queue with no
            # majority answers no get (whatever it has out goes back when the channel does)
            raise BrokerUnavailable(
                f"RabbitMQ did not answer a read of note {notes.name} in time: most of "
                "its nodes may be down; retry once they are back"
            ) from None
        if copy is None:
            break
        copies.append(copy)
        if not copy.message_count:
            break
    return copies


# -- queues that exist but are not up yet -------------------------------------------------
# Right after a broker restart a durable queue or stream is known but its member
# is still starting; a passive declare then fails with NOT_FOUND "home node ... of
# durable queue ... is down or inaccessible" for a moment (about 0.2 s on one
# node). That is not a missing topology (`covey topology apply` would not help),
# so it is waited out quietly, and reported as the broker's state if it lasts.

STARTING_SECONDS = 10.0  # how long a queue whose node is starting gets, before we say so
STARTING_POLL_SECONDS = 0.05


def starting(err: aiormq.exceptions.ChannelNotFoundEntity) -> bool:
    """Whether a NOT_FOUND says the queue exists but its node is not up (yet)."""
    return "down or inaccessible" in str(err)


def no_local_replica(err: aiormq.exceptions.ChannelPreconditionFailed) -> bool:
    """Whether a PRECONDITION_FAILED says the node holds no (running) replica of a
    stream: another node may (see Gateway.consume_stream)."""
    return "replica on the local node" in str(err)


async def _channel(
    connection: AbstractConnection, confirms: bool, prefetch: int | None
) -> AbstractChannel:
    channel = await connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
    if prefetch is not None:
        await channel.set_qos(prefetch_count=prefetch)
    return channel


async def _consume_on(
    gateway: Gateway,
    connection: AbstractConnection,
    name: str,
    offset: StreamOffset,
    on_message: OnMessage,
    prefetch: int,
) -> AbstractQueue:
    """Consume stream `name` on a new channel of `connection`; the refusal of a node
    with no replica closes that channel, and is raised."""
    try:
        queue = await gateway.existing_queue(name, prefetch=prefetch, connection=connection)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise TopologyMissing(f"stream {name} does not exist; run `covey topology apply`") from None
    try:
        await queue.consume(on_message, arguments={"x-stream-offset": offset})
    except BaseException:
        if not queue.channel.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):
                await queue.channel.close()
        raise
    return queue


async def close_channel(channel: AbstractChannel, *, quiet: bool = False) -> None:
    """Close `channel` if it is open (`quiet`: whatever the broker says meanwhile), and
    keep a cancel that lands as it closes. aiormq's close can swallow one (it awaits
    tasks of its own), and the caller, a reader closing its channel in a `finally`, then
    returns as if it had never been cancelled: `covey attach` followed on after Ctrl-C.
    A reader that closes its channel this way gives the cancel back wherever it lands."""
    try:
        if not channel.is_closed:
            if quiet:
                with contextlib.suppress(*BROKER_ERRORS):
                    await channel.close()
            else:
                await channel.close()
    finally:
        if (task := asyncio.current_task()) is not None and task.cancelling():
            raise asyncio.CancelledError


def _url_of(connection: AbstractConnection) -> str:
    # aio-pika's Connection has `url`; its abstract interface does not declare it.
    return str(getattr(connection, "url", ""))


def _open(connection: AbstractConnection) -> bool:
    """Whether a connection is still up. One the broker dropped is not `is_closed` (only
    close() sets that) but no longer `connected`: both mean it died."""
    return not connection.is_closed and connection.connected.is_set()


def _declare_error(err: BaseException) -> BaseException:
    """One line for what went wrong declaring the topology."""
    if isinstance(err, aiormq.exceptions.ChannelPreconditionFailed):
        return ConfigError(
            f"the broker has this declared with other settings ({err}); restore the old "
            "setting, or delete that queue or exchange (its messages go with it)"
        )
    if isinstance(err, aiormq.exceptions.ChannelNotFoundEntity) and not starting(err):
        # A binding to an exchange that is not there: a part declared without the core.
        return TopologyMissing(f"covey's exchanges are not there ({err}): apply the topology")
    if isinstance(err, aiormq.exceptions.ChannelAccessRefused):
        return BrokerUnavailable(
            f"RabbitMQ refused to declare covey's topology ({err}): the user in "
            "COVEY_AMQP_URL needs configure permission on this vhost"
        )
    if isinstance(err, aiormq.exceptions.AMQPError | RuntimeError | ConnectionError):
        return BrokerUnavailable(f"lost RabbitMQ while declaring the topology ({err})")
    return err


async def _declare_exchange(channel: AbstractChannel, spec: ExchangeSpec) -> None:
    arguments: dict[str, Any] = dict(spec.arguments)
    await channel.declare_exchange(spec.name, spec.type, durable=True, arguments=arguments)


# How many members a quorum queue or stream starts with (Settings.replicas). RabbitMQ
# 3.10 compares these on every re-declare like any other argument: a queue declared
# without one (by covey before it set them), or with another size (`replicas` changed
# since), refuses a declare that differs with PRECONDITION_FAILED.
SIZE_ARGUMENTS = ("x-quorum-initial-group-size", "x-initial-cluster-size")
_CURRENT_SIZE = re.compile(r"but current is (?:the value )?'(\d+)'")


async def _declare_queue(channel: AbstractChannel, spec: QueueSpec | StreamSpec) -> None:
    """Declare `spec`, with its initial size if it is new, and with the size it was
    created with if it exists (a size counts only at creation, so an existing queue
    is never refused for it, whereas any other argument that differs still is).

    One declare when the queue is new or has the size asked for; when RabbitMQ says
    the size differs, its answer says what the queue has, and the declare is repeated
    with that. Asking passively first instead would cost a round trip every time and
    leave the other arguments (a changed delivery limit) unchecked.
    """
    arguments = spec.declare_arguments
    try:
        await channel.declare_queue(spec.name, durable=True, arguments=arguments)
        return
    except aiormq.exceptions.ChannelPreconditionFailed as err:
        size = next((key for key in SIZE_ARGUMENTS if f"'{key}'" in str(err)), None)
        if size is None:
            raise
        current = _CURRENT_SIZE.search(str(err))  # none: created without one
        arguments = {key: value for key, value in arguments.items() if key != size}
        if current is not None:
            arguments[size] = int(current[1])
    await channel.reopen()  # the refusal closed it
    await channel.declare_queue(spec.name, durable=True, arguments=arguments)


async def _declare_binding(channel: AbstractChannel, spec: BindingSpec) -> None:
    queue = await channel.get_queue(spec.queue, ensure=False)
    await queue.bind(spec.exchange, spec.routing_key)


async def spread(
    channels: Sequence[AbstractChannel],
    items: Sequence[T],
    declare: Callable[[AbstractChannel, T], Awaitable[None]],
) -> None:
    """Run `declare` on every item, the items dealt round-robin over `channels`, each
    channel's share in order. One failure cancels the rest, and is raised."""

    async def run(index: int, share: Sequence[T]) -> None:
        for item in share:
            await declare(channels[index], item)

    await in_parallel(items, len(channels), run)


async def in_parallel(
    items: Sequence[T],
    parallelism: int,
    work: Callable[[int, Sequence[T]], Coroutine[Any, Any, None]],
) -> None:
    """Deal `items` round-robin into up to `parallelism` shares and `work(index, share)`
    on them all at once. One failure cancels the others, and is raised (in an
    ExceptionGroup, as asyncio.TaskGroup raises it)."""
    count = min(parallelism, len(items))
    async with asyncio.TaskGroup() as group:
        for index in range(count):
            group.create_task(work(index, items[index::count]))
