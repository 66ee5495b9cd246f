"""The one module that talks to RabbitMQ (pika). Nothing else imports pika.

It connects, declares the contract's topology, publishes persistent JSON messages with publisher
confirms within a deadline (declaring the topology again when a message finds no queue), yields
rounds of deliveries (those that arrived together, under a prefetch) and acks or puts them back.
What a message means, and what to do when handling it fails, is decided above it (sagas.consumer).
Connections are not shared between threads: one `Broker` per thread, opened after fork.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import struct
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import pika
import pika.data
import pika.exceptions
from django.conf import settings

from sagas import metrics

log = logging.getLogger(__name__)

COMMANDS_EXCHANGE = "saga.commands"
EVENTS_EXCHANGE = "saga.events"
REPLIES_QUEUE = "saga.replies"
DEAD_LETTER_QUEUE = "saga.replies.dead"
# Dead letters wait for a person; at most this many are kept, the oldest dropped first, so a
# flood of bad messages cannot fill the broker's disk. (reject-publish instead would refuse the
# consumer's set-aside publish and stop it on the first bad message over the limit.)
DEAD_LETTER_LIMIT = 100_000
DEAD_LETTER_POLICY = "saga-dead-letter-limit"
DEAD_LETTER_REASON = "x-dead-letter-reason"
MAX_REASON_CHARS = 1000
PARTICIPANT_QUEUES = {
    "stock.commands": "stock.*",
    "payment.commands": "payment.*",
    "order.commands": "order.*",
}


class BrokerUnavailable(Exception):
    """The broker could not be reached, or did not confirm a message."""


class Unroutable(BrokerUnavailable):
    """No queue took the message (e.g. a reply_to queue that is gone), even after the topology was
    declared again; sending it again at once will not help."""


class Refused(BrokerUnavailable):
    """The broker nacked the message (it could not take it); the connection is fine."""


class PublishTimeout(BrokerUnavailable):
    """No confirm within the publish deadline: the connection was dropped. The message may still
    have reached the broker (at-least-once: it will be sent again)."""


# pika's BlockingConnection waits for a publisher confirm with no time limit; past this many
# seconds a publish (or the set-up of a new connection's channel) gives up, dropping the
# connection, and leaves its outbox row to the relay.
PUBLISH_DEADLINE_SECONDS = 1.5


CONNECTION_ERRORS = (pika.exceptions.AMQPError, OSError)


class _DeadlinePassed(pika.exceptions.AMQPConnectionError):
    pass
# Headers we copy onto a message we publish again (dead letter, retry): beyond this they are
# dropped, so a sender's huge table cannot push our own publish over the broker's frame size.
MAX_COPIED_HEADERS_BYTES = 8 * 1024
HEADERS_DROPPED = "x-original-headers-dropped"


@dataclass(frozen=True)
class Delivery:
    body: bytes
    routing_key: str
    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    redelivered: bool
    # headers safe to publish again: pika encodes them, within MAX_COPIED_HEADERS_BYTES
    headers: dict = field(default_factory=dict)
    # the AMQP user_id property; RabbitMQ refuses a message whose user_id is not its connection's user
    user_id: str | None = None
    timestamp: int | None = None  # the AMQP timestamp property: when it was published (seconds)
    received_at: float = field(default_factory=time.monotonic)  # built as it arrives (sagas.metrics)
    # (channel, delivery tag): what `Broker.ack` / `nack` need; None for a message taken already acked
    receipt: tuple | None = field(default=None, compare=False, repr=False)


def _delivery(method, properties, body: bytes, receipt: tuple | None = None) -> Delivery:
    return Delivery(
        body=body,
        routing_key=method.routing_key,
        message_id=_text(properties.message_id),
        correlation_id=_text(properties.correlation_id),
        reply_to=_text(properties.reply_to),
        redelivered=method.redelivered,
        headers=_copyable_headers(properties.headers),
        user_id=_text(properties.user_id),
        timestamp=properties.timestamp if isinstance(properties.timestamp, int) else None,
        receipt=receipt,
    )


def _text(value) -> str | None:
    # pika hands over a short string that is not UTF-8 as bytes; none of ours is like that
    return value if isinstance(value, str) else None


def _copyable_headers(headers: dict | None) -> dict:
    if not headers:
        return {}
    try:
        pieces: list[bytes] = []
        size = pika.data.encode_table(pieces, headers)
    except Exception as error:  # any value pika cannot encode again (a Decimal out of range, ...)
        return {HEADERS_DROPPED: f"not encodable: {type(error).__name__}"}
    if size > MAX_COPIED_HEADERS_BYTES:
        return {HEADERS_DROPPED: f"{size} bytes, over {MAX_COPIED_HEADERS_BYTES}"}
    return dict(headers)


UNDECODABLE_TABLE = "x-undecodable-table"
_pika_decode_table = pika.data.decode_table


def _decode_table_or_mark(encoded: bytes, offset: int):
    """pika's decode_table, except that a table it cannot decode becomes a marker instead of
    ending the connection: a sender's header with, say, a timestamp beyond year 9999 made pika
    drop the connection on every redelivery, so one message stopped every consumer for good."""
    try:
        return _pika_decode_table(encoded, offset)
    except Exception:  # the table's length prefix still tells where the rest of the frame starts
        size = struct.unpack_from(">I", encoded, offset)[0]
        return {UNDECODABLE_TABLE: True}, offset + 4 + size


pika.data.decode_table = _decode_table_or_mark


def connection_parameters(*, heartbeat: int = 30) -> pika.ConnectionParameters:
    rabbit = settings.RABBITMQ
    return pika.ConnectionParameters(
        host=rabbit["host"],
        port=rabbit["port"],
        virtual_host=rabbit["vhost"],
        credentials=pika.PlainCredentials(rabbit["user"], rabbit["password"]),
        heartbeat=heartbeat,
        blocked_connection_timeout=10,
        socket_timeout=2,
        stack_timeout=5,
        connection_attempts=1,
        client_properties={"connection_name": "order-orchestrator"},
    )


def participant_queues() -> dict[str, str]:
    """Each participant's command queue and its binding: the contract's three, and one for each
    participant of a registered flow (`<participant>.commands` bound to `<participant>.*`)."""
    from sagas import flows  # plain data; imported here so the broker module stays first to load

    declared = {f"{participant}.commands": f"{participant}.*"
                for flow in flows.registered() for participant in sorted(flow.participants)}
    return {**PARTICIPANT_QUEUES, **declared}


def queue_arguments() -> dict:
    """The arguments of every queue of the contract: its type (RABBITMQ_QUEUE_TYPE). Classic queues
    are declared without the argument, as they always were; a queue that exists with another type
    refuses the declaration (PRECONDITION_FAILED): docs/operations.md#queue-type tells the move."""
    queue_type = settings.RABBITMQ_QUEUE_TYPE
    return {} if queue_type == "classic" else {"x-queue-type": queue_type}


def declare_topology(channel) -> None:
    """Declare every exchange and queue of the contract, so no command is ever unroutable."""
    channel.exchange_declare(COMMANDS_EXCHANGE, exchange_type="topic", durable=True)
    channel.exchange_declare(EVENTS_EXCHANGE, exchange_type="topic", durable=True)
    for queue_name, binding in participant_queues().items():
        channel.queue_declare(queue_name, durable=True, arguments=queue_arguments())
        channel.queue_bind(queue_name, COMMANDS_EXCHANGE, routing_key=binding)
    channel.queue_declare(REPLIES_QUEUE, durable=True, arguments=queue_arguments())
    _declare_dead_letter_queue(channel.connection)


def dead_letter_policy_command(vhost: str) -> str:
    """The rabbitmqctl command that gives a dead-letter queue declared without a limit its limit."""
    definition = json.dumps({"max-length": DEAD_LETTER_LIMIT, "overflow": "drop-head"}, separators=(",", ":"))
    pattern = "^" + DEAD_LETTER_QUEUE.replace(".", "\\.") + "$"
    return f"rabbitmqctl set_policy -p {vhost} --apply-to queues {DEAD_LETTER_POLICY} '{pattern}' '{definition}'"


_warned_unlimited = False


def _declare_dead_letter_queue(connection) -> None:
    """Declare the dead-letter queue with its length limit, on a channel of its own: a queue
    declared before the limit existed refuses the new arguments (PRECONDITION_FAILED closes
    the channel), and then it is kept as it is and a policy gives it the limit."""
    global _warned_unlimited
    channel = connection.channel()
    try:
        channel.queue_declare(DEAD_LETTER_QUEUE, durable=True,
                              arguments={"x-max-length": DEAD_LETTER_LIMIT, "x-overflow": "drop-head", **queue_arguments()})
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code != 406:
            raise
        channel = connection.channel()
        channel.queue_declare(DEAD_LETTER_QUEUE, passive=True)
        if not _warned_unlimited:
            _warned_unlimited = True
            log.warning("dead-letter queue was declared without its length limit; apply it as a policy: %s",
                        dead_letter_policy_command(settings.RABBITMQ["vhost"]), extra={"queue": DEAD_LETTER_QUEUE})
    channel.close()


@dataclass(frozen=True)
class Message:
    """One message to publish, persistent, as JSON. `mandatory`: a message no queue takes is an
    error (commands, replies); events go without it: an event nobody subscribed to is nobody's loss."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    headers: dict | None = None
    mandatory: bool = True

    def properties(self, user: str) -> pika.BasicProperties:
        return pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=self.message_id or str(uuid.uuid4()),
            correlation_id=self.correlation_id,
            reply_to=self.reply_to,
            headers=self.headers or None,
            timestamp=int(time.time()),
            # RabbitMQ checks it is this connection's user: a participant can tell our commands
            # from ones another participant slipped into its queue through the default exchange
            user_id=user,
        )


class _Confirms:
    """Publisher confirms on one channel, for a round of messages at a time: the broker numbers
    the messages of a channel 1, 2, ... and acks or nacks each (or all up to one, `multiple`);
    an unroutable mandatory message comes back (Basic.Return) before its ack.

    pika's BlockingChannel waits for each message's confirm before the next publish; this waits
    for a round's together. It works on the channel's underlying pika channel (`_impl`) and
    waits with the BlockingChannel's `_flush_output`: private pika API, pinned in
    requirements.txt; tests/test_broker.py and the stalled-link tests of tests/test_outbox.py
    prove it."""

    def __init__(self, channel):
        self._published = 0  # the broker's number of the last message published on the channel
        self._first = 1  # the number of the round's first message
        self._pending: dict[int, Message] = {}  # broker's number -> message, unsettled
        self._settled: dict[int, BrokerUnavailable | None] = {}
        self._returned: set[str] = set()  # message ids
        selected = []
        channel._impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=selected.append)
        channel._impl.add_on_return_callback(self._on_return)
        channel._flush_output(lambda: bool(selected))

    def expect(self, messages: list[Message]) -> list[Message]:
        """The messages about to be published, each with a message id (to tell a returned one)
        and the broker's number for it; returns them so."""
        self._pending, self._settled, self._returned = {}, {}, set()
        self._first = self._published + 1
        for message in messages:
            if not message.message_id:
                message = dataclasses.replace(message, message_id=str(uuid.uuid4()))
            self._published += 1
            self._pending[self._published] = message
        return list(self._pending.values())

    def all_settled(self) -> bool:
        return not self._pending

    def outcomes(self, unsettled) -> list:
        """Each expected message's outcome; `unsettled(message)`: the error of one not settled."""
        return [self._settled[tag] if tag in self._settled else unsettled(self._pending[tag])
                for tag in range(self._first, self._published + 1)]

    def _on_confirm(self, frame) -> None:
        method = frame.method
        tags = [t for t in self._pending if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        for tag in tags:
            message = self._pending.pop(tag, None)
            if message is None:
                continue
            if isinstance(method, pika.spec.Basic.Nack):
                self._settled[tag] = Refused(f"broker did not take the message for {message.routing_key!r}")
            elif message.message_id in self._returned:
                self._settled[tag] = Unroutable(f"no queue for routing key {message.routing_key!r}")
            else:
                self._settled[tag] = None

    def _on_return(self, channel, method, properties, body) -> None:
        self._returned.add(properties.message_id)


def encode(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


class Broker:
    """One connection with a confirming publish channel; optionally a consumer on the same connection."""

    def __init__(self, *, heartbeat: int = 30, publish_deadline: float = PUBLISH_DEADLINE_SECONDS):
        self._heartbeat = heartbeat
        self._publish_deadline = publish_deadline
        self._connection = None
        self._channel = None
        self._confirms: _Confirms | None = None
        self._consume_channel = None
        self._arrived: list[Delivery] = []

    @property
    def connected(self) -> bool:
        """Whether this broker holds a connection (consume drops it when the broker goes away)."""
        return self._connection is not None

    def _ensure(self):
        if self._connection is None or self._connection.is_closed or self._channel.is_closed:
            self.close()
            try:
                self._connection = pika.BlockingConnection(connection_parameters(heartbeat=self._heartbeat))
                with self._deadline():  # the handshake had its own (stack_timeout); the set-up gets this one
                    self._channel = self._connection.channel()
                    self._confirms = _Confirms(self._channel)
                    declare_topology(self._channel)
                metrics.broker_connected(self)
            except CONNECTION_ERRORS as error:
                self.close()
                raise BrokerUnavailable(f"cannot connect to RabbitMQ: {error!r}") from error
        return self._channel

    def connect(self) -> None:
        """Open the connection (declaring the topology) unless it is open; raises BrokerUnavailable."""
        self._ensure()

    def keep_alive(self) -> None:
        """Let an idle connection exchange heartbeats, so a dead peer is noticed (and dropped) now
        rather than by the next publish. BlockingConnection does I/O only inside its calls."""
        if self._connection is None:
            return
        try:
            self._connection.process_data_events(time_limit=0)
        except CONNECTION_ERRORS as error:
            log.warning("RabbitMQ connection lost while idle: %r", error)
            self.close()

    def publish(self, **message) -> None:
        """Publish one persistent message (the fields of `Message`) and wait for the broker's
        confirm; raises what `publish_all` gives for it."""
        [outcome] = self.publish_all([Message(**message)])
        if outcome is not None:
            raise outcome

    def publish_all(self, messages: list[Message]) -> list[BrokerUnavailable | None]:
        """Publish a round of messages, in order, and wait for their confirms together, within one
        publish deadline (and one more for those no queue took: the topology is declared again and
        they are sent once more), so a round is for as many messages as one deadline allows. One
        outcome each: None (confirmed), `Unroutable`, `Refused` (nacked), or, for those the
        connection took down with it, `PublishTimeout` / `BrokerUnavailable` (the connection is
        then dropped)."""
        if not messages:
            return []
        try:
            confirms = self._ensure_confirms()
        except BrokerUnavailable as error:
            return [error] * len(messages)
        outcomes = self._publish_round(confirms, messages, list(range(len(messages))))
        unroutable = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, Unroutable)]
        if unroutable and self.connected:
            # someone deleted a queue (or a binding): declare ours again and send those once more
            for i, outcome in zip(unroutable, self._publish_round(confirms, messages, unroutable, declare=True)):
                outcomes[i] = outcome
        return outcomes

    def _publish_round(self, confirms: _Confirms, messages: list[Message], indexes: list[int], *,
                       declare: bool = False) -> list:
        """Publish messages[i] for i in indexes (after declaring the topology, with `declare`),
        within one deadline; their outcomes, in that order."""
        channel, user = self._channel, settings.RABBITMQ["user"]
        try:
            with self._deadline():
                if declare:
                    declare_topology(channel)
                for message in confirms.expect([messages[i] for i in indexes]):
                    channel._impl.basic_publish(message.exchange, message.routing_key, message.body,
                                                message.properties(user), mandatory=message.mandatory)
                channel._flush_output(confirms.all_settled)
        except _DeadlinePassed:
            self.close()
            return confirms.outcomes(lambda m: PublishTimeout(
                f"no confirm within {self._publish_deadline}s for {m.routing_key!r}"))
        except CONNECTION_ERRORS as error:
            self.close()
            lost = f"lost RabbitMQ while publishing: {error!r}"
            return confirms.outcomes(lambda m: BrokerUnavailable(lost))
        except BaseException:
            self.close()  # the broker's numbering of this channel's messages is not known any more
            raise
        return confirms.outcomes(lambda m: BrokerUnavailable(f"no confirm for {m.routing_key!r}"))

    def _ensure_confirms(self) -> _Confirms:
        self._ensure()
        return self._confirms

    @contextmanager
    def _deadline(self):
        """Drop the connection if the calls inside have not finished within the publish deadline;
        the call waiting then raises `_DeadlinePassed`.

        pika's blocking calls (a confirm, a declare) wait with no time limit, but they drive the
        connection's I/O loop while they wait, and its timers with it. This timer ends the wait
        the way pika's own blocked_connection_timeout and heartbeat checker do (`_terminate_stream`).
        Private pika API, pinned in requirements.txt; tests/test_outbox.py proves it on a stalled link."""
        connection = self._connection
        impl = connection._impl
        timer = impl._adapter_call_later(
            self._publish_deadline, lambda: impl._terminate_stream(_DeadlinePassed("deadline passed")))
        try:
            yield
        finally:
            if not connection.is_closed:
                impl._adapter_remove_timeout(timer)

    def next_round(self, queue_name: str, *, prefetch: int, timeout: float) -> list[Delivery]:
        """The deliveries of `queue_name` that have arrived, at most `prefetch` unsettled at once,
        waiting up to `timeout` seconds for the first (an empty round when none came). Consumes
        first, and again once a lost connection was reopened. Each delivery must be settled with
        `ack` or `nack`; those of a lost connection come back by themselves. Raises BrokerUnavailable."""
        channel = self._consuming(queue_name, prefetch)
        try:
            channel.connection.process_data_events(time_limit=0 if self._arrived else timeout)
        except CONNECTION_ERRORS as error:
            self.close()
            raise BrokerUnavailable(f"lost RabbitMQ while consuming {queue_name}: {error!r}") from error
        round_, self._arrived = self._arrived, []
        return round_

    def pending(self) -> bool:
        """Whether more deliveries have arrived already (a backlog), without waiting."""
        if self._consume_channel is None or not self._consume_channel.is_open:
            return False
        try:
            self._consume_channel.connection.process_data_events(time_limit=0)
        except CONNECTION_ERRORS as error:
            log.warning("RabbitMQ connection lost while consuming: %r", error)
            self.close()
        return bool(self._arrived)

    def _consuming(self, queue_name: str, prefetch: int):
        channel = self._consume_channel
        if channel is not None and channel.is_open and self._connection is not None \
                and channel.connection is self._connection:
            return channel
        # first time, or a publish lost the connection (and may have opened another, with no
        # consumer on it): consume (again) on the connection of now
        self._arrived = []
        self._ensure()
        try:
            channel = self._connection.channel()
            channel.basic_qos(prefetch_count=prefetch)
            channel.basic_consume(queue_name, lambda ch, method, properties, body: self._arrived.append(
                _delivery(method, properties, body, receipt=(ch, method.delivery_tag))))
        except CONNECTION_ERRORS as error:
            self.close()
            raise BrokerUnavailable(f"cannot consume {queue_name}: {error!r}") from error
        self._consume_channel = channel
        log.info("consuming", extra={"queue": queue_name, "prefetch": prefetch})
        return channel

    def ack(self, deliveries: list[Delivery]) -> None:
        """Settle the deliveries: the broker forgets them. Raises BrokerUnavailable."""
        self._settle(deliveries, lambda channel, tag: channel.basic_ack(tag))

    def nack(self, deliveries: list[Delivery]) -> None:
        """Put the deliveries back in their queue (redelivered). Raises BrokerUnavailable."""
        self._settle(deliveries, lambda channel, tag: channel.basic_nack(tag, requeue=True))

    def _settle(self, deliveries: list[Delivery], settle: Callable) -> None:
        try:
            for delivery in deliveries:
                channel, tag = delivery.receipt
                if channel is self._consume_channel and channel.is_open:  # else it comes back by itself
                    settle(channel, tag)
        except CONNECTION_ERRORS as error:
            self.close()
            raise BrokerUnavailable(f"lost RabbitMQ while settling deliveries: {error!r}") from error

    def consume(self, queue_name: str, handle: Callable[[Delivery], None], *, prefetch: int,
                should_stop: Callable[[], bool], tick: Callable[[], None] = lambda: None,
                tick_seconds: float = 0.2) -> None:
        """A plain loop over `next_round` for the demo participants and the lab: each delivery to
        `handle`, acked once it returns; `RetryLater` or any other exception puts it back after a
        pause. `tick` between rounds. A lost connection is reopened with backoff."""
        backoff = Backoff()
        while not should_stop():
            try:
                for delivery in self.next_round(queue_name, prefetch=prefetch, timeout=tick_seconds):
                    if should_stop():
                        self.nack([delivery])
                        continue
                    try:
                        handle(delivery)
                    except (BrokerUnavailable, *CONNECTION_ERRORS):
                        raise
                    except Exception as error:
                        pause = error.pause if isinstance(error, RetryLater) else 1.0
                        log.warning("message put back: %r", error, exc_info=not isinstance(error, RetryLater),
                                    extra={"queue": queue_name})
                        self.nack([delivery])
                        time.sleep(pause)
                        continue
                    self.ack([delivery])
                backoff.reset()
                tick()
            except (BrokerUnavailable, *CONNECTION_ERRORS) as error:
                self.close()
                pause = backoff.next()
                log.warning("RabbitMQ unavailable, retrying in %.1fs: %r", pause, error, extra={"queue": queue_name})
                sleep_unless(should_stop, pause)

    def declare_queue(self, queue_name: str, *, exchange: str, routing_key: str) -> None:
        """A durable queue bound to `exchange`, for a participant that brings its own queue
        (declare_topology does not know it). Raises BrokerUnavailable."""
        channel = self._ensure()
        try:
            channel.queue_declare(queue_name, durable=True)
            channel.queue_bind(queue_name, exchange, routing_key=routing_key)
        except CONNECTION_ERRORS as error:
            self.close()
            raise BrokerUnavailable(f"cannot declare {queue_name}: {error!r}") from error

    def bind_temporary_queue(self, exchange: str, routing_key: str) -> str:
        """A private queue bound to `exchange`, gone when this connection closes (for listeners and tests)."""
        channel = self._ensure()
        queue_name = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(queue_name, exchange, routing_key=routing_key)
        return queue_name

    def drain(self, queue_name: str) -> list[Delivery]:
        """Take every message waiting in a queue, acking each."""
        channel, taken = self._ensure(), []
        while True:
            method, properties, body = channel.basic_get(queue_name, auto_ack=True)
            if method is None:
                return taken
            taken.append(_delivery(method, properties, body))

    def take(self, queue_name: str, handle: Callable[[Delivery], None], *, limit: int) -> int:
        """Hand up to `limit` waiting messages to `handle`, one at a time, acking each only after
        `handle` returned (one that raises goes back to the queue, and the error up). Returns how
        many messages the queue still held after the last one taken."""
        channel = self._ensure()
        try:
            for _ in range(limit):
                method, properties, body = channel.basic_get(queue_name, auto_ack=False)
                if method is None:
                    return 0
                try:
                    handle(_delivery(method, properties, body))
                except BaseException:
                    channel.basic_nack(method.delivery_tag, requeue=True)
                    raise
                channel.basic_ack(method.delivery_tag)
            return method.message_count
        except CONNECTION_ERRORS as error:
            self.close()
            raise BrokerUnavailable(f"lost RabbitMQ while taking from {queue_name}: {error!r}") from error

    def purge(self, *queue_names: str) -> None:
        channel = self._ensure()
        for queue_name in queue_names:
            channel.queue_purge(queue_name)

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._consume_channel, self._arrived = None, []
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except CONNECTION_ERRORS:
                pass


class RetryLater(Exception):
    def __init__(self, reason: str, *, pause: float = 1.0):
        super().__init__(reason)
        self.pause = pause


class Backoff:
    """Exponential backoff from 0.2 s up to 10 s."""

    def __init__(self, first: float = 0.2, cap: float = 10.0):
        self.first, self.cap, self.current = first, cap, first

    def next(self) -> float:
        pause, self.current = self.current, min(self.current * 2, self.cap)
        return pause

    def reset(self) -> None:
        self.current = self.first


def sleep_unless(should_stop: Callable[[], bool], seconds: float) -> None:
    """Sleep `seconds`, or less if `should_stop()` turns true meanwhile."""
    end = time.monotonic() + seconds
    while not should_stop() and time.monotonic() < end:
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))
