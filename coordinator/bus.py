"""The transport: one connection to RabbitMQ that declares topology, publishes and consumes.

Publishing is always confirmed and `mandatory`: `publish` returns only once
the broker has taken responsibility for the message, and raises when it did
not. Every publish is signed: its `user_id` is the connection's own user, which
RabbitMQ checks, so a reader can trust it (see `identity.py`). Envelopes become
AMQP messages here (and back), so the rest of covey never handles AMQP
properties itself.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from yarl import URL

from coordinator.envelope import MESSAGE_TYPE, Envelope, now
from coordinator.errors import BrokerUnavailable, ConfigError, NoRecipient, TopologyMissing
from coordinator.events import EVENT_TYPE, Event
from coordinator.identity import url_user
from coordinator.settings import Settings
from coordinator.topology import (
    DEAD,
    EVENTS_EXCHANGE,
    MAIL_EXCHANGE,
    NOTES_EXCHANGE,
    BindingSpec,
    ExchangeSpec,
    QueueSpec,
    StreamSpec,
    Topology,
)

T = TypeVar("T")

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


def redacted(url: str) -> str:
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


def signer(connection: AbstractConnection) -> str:
    """The user a connection logged in as: the `user_id` RabbitMQ lets it publish with."""
    return url_user(str(connection.url))


def to_amqp(envelope: Envelope, user_id: str) -> aio_pika.Message:
    expiration: timedelta | None = None
    if envelope.expires_at is not None:
        # A message that is already due still needs a positive TTL to be accepted;
        # the broker then dead-letters it at once as `expired`.
        expiration = max(envelope.expires_at - now(), timedelta(milliseconds=1))
    return aio_pika.Message(
        body=envelope.to_json(),
        content_type="application/json",
        type=MESSAGE_TYPE,
        message_id=envelope.id,
        timestamp=envelope.created_at,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        expiration=expiration,
        app_id="covey",
        user_id=user_id,
    )


async def open_connection(
    settings: Settings, name: str, heartbeat: int | None = None
) -> AbstractConnection:
    """A plain (not self-reconnecting) connection, or BrokerUnavailable in one line."""
    url = URL(settings.amqp_url)
    if heartbeat is not None:
        url = url.update_query(heartbeat=heartbeat)
    shown = redacted(settings.amqp_url)
    try:
        return await aio_pika.connect(
            url,
            timeout=settings.connect_timeout,
            client_properties={"connection_name": name},
            ssl_context=tls_context(settings) if url.scheme == "amqps" else None,
        )
    except aiormq.exceptions.ProbableAuthenticationError:
        raise BrokerUnavailable(
            f"RabbitMQ at {shown} refused the login: check the user and password in COVEY_AMQP_URL"
        ) from None
    except aiormq.exceptions.ProtocolSyntaxError:
        raise BrokerUnavailable(
            f"RabbitMQ at {shown} refused to open the connection: check that the vhost in "
            "COVEY_AMQP_URL exists and the user may use it"
        ) from None
    except (OSError, TimeoutError, aiormq.exceptions.AMQPError) as err:
        tls = err if isinstance(err, ssl.SSLError) else err.__cause__  # aiormq wraps it
        if isinstance(tls, ssl.SSLError):
            raise BrokerUnavailable(
                f"TLS with RabbitMQ at {shown} failed ({tls.verify_message or tls.reason}): "
                "set tls_ca to the CA that signed the broker's certificate (and tls_cert, "
                "tls_key where it asks for a client certificate)"
            ) from None
        raise BrokerUnavailable(
            f"cannot reach RabbitMQ at {shown} ({err}): start it, or point COVEY_AMQP_URL at one"
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


class Bus:
    """One AMQP connection and the channels covey needs on it. Use `async with`."""

    def __init__(self, connection: AbstractConnection, settings: Settings, name: str) -> None:
        self._connection = connection
        self._settings = settings
        self._name = name
        self._publisher: AbstractChannel | None = None
        self._publisher_opening = asyncio.Lock()  # concurrent first publishes share one channel
        self.user = signer(connection)

    @classmethod
    async def connect(cls, settings: Settings, name: str = "covey") -> Bus:
        """Connect, or raise BrokerUnavailable with one line saying why and what to do."""
        return cls(await open_connection(settings, name), settings, name)

    @property
    def connection(self) -> AbstractConnection:
        return self._connection

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._connection.close()

    # -- topology ------------------------------------------------------------

    async def apply(self, topology: Topology, parallelism: int = 8) -> None:
        """Declare `topology` idempotently, spread over `parallelism` channels.

        One AMQP channel runs one method at a time, so a large roster declares
        much faster over several channels than down one; a small topology is not
        worth the extra channels. Each queue is bound as soon as it is declared,
        so that binding overlaps the broker's (slow) creation of other queues.
        """
        count = max(1, min(parallelism, len(topology.bindings) // 16))
        channels = await asyncio.gather(*(self._connection.channel() for _ in range(count)))
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
            await _spread(channels, topology.exchanges, _declare_exchange)
            await _spread(channels, topology.queues, declare_and_bind)
            await _spread(channels, elsewhere, _declare_binding)
        except ExceptionGroup as group:  # the TaskGroup in _spread: report the first
            raise _declare_error(group.exceptions[0]) from None
        finally:
            for channel in channels:
                if not channel.is_closed:
                    await channel.close()

    async def purge(self, queues: Iterable[str]) -> None:
        """Empty queues; their messages are gone for good."""
        async with await self._connection.channel() as channel:
            for name in queues:
                await (await channel.get_queue(name, ensure=False)).purge()

    # -- publishing ----------------------------------------------------------

    async def _publish_channel(self) -> AbstractChannel:
        async with self._publisher_opening:
            if self._publisher is not None and not self._publisher.is_closed:
                return self._publisher
            try:
                self._publisher = await self._open_publisher()
            except (RuntimeError, ConnectionError, aiormq.exceptions.AMQPConnectionError):
                # Publishing is safe to retry on a new connection (unlike holding a
                # lock), so a long run can still record how it ended after a hiccup.
                self._connection = await open_connection(self._settings, self._name)
                self._publisher = await self._open_publisher()
            return self._publisher

    async def _open_publisher(self) -> AbstractChannel:
        return await self._connection.channel(publisher_confirms=True, on_return_raises=True)

    async def _exchange(self, name: str) -> AbstractExchange:
        channel = await self._publish_channel()
        return await channel.get_exchange(name, ensure=False)

    async def publish(self, envelope: Envelope, timeout: float | None = None) -> None:
        """Publish to the recipient's routing key; return once the broker confirmed."""
        exchange = await self._exchange(MAIL_EXCHANGE)
        routing_key = envelope.recipient_address.routing_key
        await self._confirmed(
            exchange.publish(
                to_amqp(envelope, self.user), routing_key, mandatory=True, timeout=timeout
            ),
            what=f"message {envelope.id} to {envelope.recipient}",
        )

    async def publish_event(self, event: Event, mandatory: bool = False) -> None:
        """Publish a control event to `covey.events`, confirmed. Most events are not
        `mandatory` (a dashboard may or may not be listening); a request is, since
        nobody taking it is worth an error."""
        exchange = await self._exchange(EVENTS_EXCHANGE)
        message = aio_pika.Message(
            body=event.model_dump_json(exclude_none=True).encode(),
            content_type="application/json",
            type=EVENT_TYPE,
            timestamp=event.at,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            app_id="covey",
            user_id=self.user,
        )
        await self._confirmed(
            exchange.publish(
                message,
                event.routing_key,
                mandatory=mandatory,
                timeout=self._settings.connect_timeout,
            ),
            what=event.kind,
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
        copy = copy_of(message, headers, user_id=self.user)
        exchange = await self._exchange(DEAD)
        await self._confirmed(
            exchange.publish(
                copy,
                message.routing_key or "",
                mandatory=True,
                timeout=self._settings.connect_timeout,
            ),
            what=f"dead letter for {message.message_id or 'a delivery'}",
        )

    async def _confirmed(self, publishing: Awaitable[T], what: str) -> T:
        try:
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
            raise BrokerUnavailable(
                f"RabbitMQ did not confirm {what} in time: it may be blocking publishers "
                "(memory or disk alarm); treat it as not sent"
            ) from None
        except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError) as err:
            self._publisher = None  # the next publish starts on a fresh channel, or connection
            raise BrokerUnavailable(f"lost RabbitMQ while publishing {what} ({err})") from None

    # -- consuming -----------------------------------------------------------

    async def queue(self, name: str, channel: AbstractChannel | None = None) -> AbstractQueue:
        """An existing queue, on `channel` or on a channel of its own (the caller closes
        `queue.channel`).

        Its `declaration_result.message_count` says how many messages are ready.
        Raises TopologyMissing when the queue does not exist.
        """
        try:
            if channel is None:
                return await existing_queue(self._connection, name)
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


async def existing_queue(
    connection: AbstractConnection, name: str, prefetch: int | None = None
) -> AbstractQueue:
    """Passively declare `name` on a channel of its own (the caller closes
    `queue.channel`), waiting out a node that is still starting. Raises
    ChannelNotFoundEntity when the queue does not exist (each caller says what that
    means), BrokerUnavailable when it stays unavailable past STARTING_SECONDS."""
    deadline = asyncio.get_running_loop().time() + STARTING_SECONDS
    while True:
        channel = await connection.channel()
        if prefetch is not None:
            await channel.set_qos(prefetch_count=prefetch)
        try:
            return await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity as err:
            if not starting(err):
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise BrokerUnavailable(
                    f"{name} is not available: its RabbitMQ node is down or still starting "
                    "(the queue itself exists); check the broker, then retry"
                ) from None
        await asyncio.sleep(STARTING_POLL_SECONDS)


# -- notes: one-message queues, newest wins ------------------------------------------------
# A small piece of shared state kept on the broker (a lock's holder, an agent's
# changelog cursor): a durable queue of at most one message, where a new write
# drops the old one, and a read is a peek (get, then reject back into the queue).
# Notes are written through the `covey.notes` topic exchange, each bound by its
# own name, not through the default exchange: a user allowed to publish to the
# default exchange may publish into any queue, whereas topic permissions on
# `covey.notes` say whose notes a provisioned user may write.

NOTE_ARGUMENTS = {"x-max-length": 1, "x-overflow": "drop-head"}


async def write_note(connection: AbstractConnection, queue: str, body: bytes) -> None:
    """Replace the note in `queue` (created if need be); confirmed before returning."""
    message = aio_pika.Message(
        body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, user_id=signer(connection)
    )
    for attempt in range(2):
        async with await connection.channel(publisher_confirms=True) as channel:
            note = await channel.declare_queue(queue, durable=True, arguments=NOTE_ARGUMENTS)
            try:
                await note.bind(NOTES_EXCHANGE, queue)
            except aiormq.exceptions.ChannelNotFoundEntity:
                if attempt:
                    raise
                await _declare_notes_exchange(connection)  # a namespace nobody has set up
                continue
            notes = await channel.get_exchange(NOTES_EXCHANGE, ensure=False)
            await notes.publish(message, queue)
            return


async def _declare_notes_exchange(connection: AbstractConnection) -> None:
    async with await connection.channel() as channel:
        await channel.declare_exchange(NOTES_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)


async def read_note(connection: AbstractConnection, queue: str) -> bytes | None:
    """The note in `queue`, left in place; None when there is none (or no queue).

    A note queue is never empty once written, so an empty one means another reader
    has the note out for its own peek: try again in a moment rather than answer None.
    """
    try:
        notes = await existing_queue(connection, queue)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    channel = notes.channel
    try:
        for _ in range(NOTE_ATTEMPTS):
            note = await notes.get(fail=False, no_ack=False)
            if note is not None:
                await note.reject(requeue=True)
                return note.body
            await asyncio.sleep(NOTE_RETRY_SECONDS)
        return None  # declared, never written (its writer died between the two)
    finally:
        if not channel.is_closed:
            await channel.close()


def _declare_error(err: BaseException) -> BaseException:
    """One line for what went wrong declaring the topology."""
    if isinstance(err, aiormq.exceptions.ChannelPreconditionFailed):
        return ConfigError(
            f"the broker has this declared with other settings ({err}); restore the old "
            "setting, or delete that queue or exchange (its messages go with it)"
        )
    if isinstance(err, aiormq.exceptions.ChannelAccessRefused):
        return BrokerUnavailable(
            f"RabbitMQ refused to declare covey's topology ({err}): the user in "
            "COVEY_AMQP_URL needs configure permission on this vhost"
        )
    if isinstance(err, aiormq.exceptions.AMQPError | RuntimeError | ConnectionError):
        return BrokerUnavailable(f"lost RabbitMQ while declaring the topology ({err})")
    return err


async def _declare_exchange(channel: AbstractChannel, spec: ExchangeSpec) -> None:
    await channel.declare_exchange(
        spec.name, spec.type, durable=True, arguments=dict(spec.arguments)
    )


async def _declare_queue(channel: AbstractChannel, spec: QueueSpec | StreamSpec) -> None:
    await channel.declare_queue(spec.name, durable=True, arguments=spec.declare_arguments)


async def _declare_binding(channel: AbstractChannel, spec: BindingSpec) -> None:
    queue = await channel.get_queue(spec.queue, ensure=False)
    await queue.bind(spec.exchange, spec.routing_key)


async def _spread(
    channels: Sequence[AbstractChannel],
    items: Sequence[T],
    declare: Callable[[AbstractChannel, T], Awaitable[None]],
) -> None:
    async def run(channel: AbstractChannel, share: Sequence[T]) -> None:
        for item in share:
            await declare(channel, item)

    count = len(channels)
    async with asyncio.TaskGroup() as group:  # one failure cancels the rest, and is raised
        for i in range(count):
            group.create_task(run(channels[i], items[i::count]))
