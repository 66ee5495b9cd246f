"""A participant that sends whatever it likes to saga.replies: any body, any properties, even a
header table pika itself would not write. pika is imported here because this plays a foreign
client on the wire, not the orchestrator."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import pika
import pika.data
from django.conf import settings

from sagas import services
from sagas.broker import REPLIES_QUEUE
from tests.conftest import ORDER


@dataclass(frozen=True)
class Raw:
    """A header table value written as these exact bytes (type octet and value)."""

    encoded: bytes


@dataclass(frozen=True)
class Outgoing:
    body: bytes
    headers: dict | None = None
    message_id: str | bytes | None = None
    correlation_id: str | bytes | None = None
    user_id: str | None = None
    # what the test expects: "applied" (a good reply) or "dead" (set aside)
    fate: str = "dead"
    extra: dict = field(default_factory=dict)


_PIKA_ENCODE_VALUE = pika.data.encode_value


def _encode_value(pieces, value):
    if isinstance(value, Raw):
        pieces.append(value.encoded)
        return len(value.encoded)
    return _PIKA_ENCODE_VALUE(pieces, value)


def huge_timestamp() -> Raw:
    """A timestamp past year 9999: the broker passes it, pika's decoder cannot turn it into a datetime."""
    return Raw(struct.pack(">cQ", b"T", 2**64 - 1))


def connection(*, user: str | None = None, password: str | None = None) -> pika.BlockingConnection:
    rabbit = settings.RABBITMQ
    return pika.BlockingConnection(pika.ConnectionParameters(
        host=rabbit["host"], port=rabbit["port"], virtual_host=rabbit["vhost"],
        credentials=pika.PlainCredentials(user or rabbit["user"], password or rabbit["password"]),
        connection_attempts=1, socket_timeout=5, blocked_connection_timeout=10))


def publish_round(messages: list[Outgoing], *, user: str | None = None, password: str | None = None) -> None:
    """Publish every message back to back on one channel with no confirm between them, so they
    reach the consumer together as one round; then wait for the broker's confirm of them all."""
    pika.data.encode_value = _encode_value  # only Raw values behave differently
    conn = connection(user=user, password=password)
    try:
        channel = conn.channel()
        channel.tx_select()  # one commit for the round: all in the queue at once, confirmed together
        for message in messages:
            channel.basic_publish("", REPLIES_QUEUE, message.body, pika.BasicProperties(
                content_type="application/json", delivery_mode=2, headers=message.headers,
                message_id=message.message_id, correlation_id=message.correlation_id, user_id=message.user_id))
        channel.tx_commit()
    finally:
        pika.data.encode_value = _PIKA_ENCODE_VALUE
        if conn.is_open:
            conn.close()


def awaiting_sagas(count: int) -> list[str]:
    """Sagas that wait for the stock.reduce reply of attempt 1."""
    return [str(services.start_order_saga(user_id="alice", items=ORDER["items"], currency="EUR",
                                          payment_method=None)[0].pk) for _ in range(count)]


def good_reply(saga_id: str, **changes) -> bytes:
    body = {"saga_id": saga_id, "command": "stock.reduce", "attempt": 1, "status": "success", "reason": None,
            "data": {"total": "19.98"}, **changes}
    return json.dumps(body).encode()


def queue_depth(queue: str) -> int:
    """Messages ready in the queue."""
    conn = connection()
    try:
        return conn.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        conn.close()

