"""The machine's shared services (PostgreSQL, Redis, RabbitMQ) as a fault run sees them: the
faults that break them, `heal`, which brings every one of them back, and a look at the broker
from outside. The run's own database, Redis db and vhost are lab.sandbox's.

Restarting a shared service disturbs other people's runs on the machine for a moment; every
restart here brings the service back in a `finally`, so an interrupted run never leaves one down.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass

import pika
import pika.exceptions
import redis

from lab.sandbox import REDIS_PORT, redis_client

log = logging.getLogger(__name__)

RABBITMQ_HOST, RABBITMQ_PORT, RABBITMQ_USER, RABBITMQ_PASSWORD = "127.0.0.1", 5672, "guest", "guest"
REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", str(REDIS_PORT),
               "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"]


def _run(argv: list[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result


# --- faults on the shared services ----------------------------------------------------------


def postgres_cluster() -> tuple[str, str]:
    versions = sorted(os.listdir("/etc/postgresql"))
    return versions[-1], "main"


def restart_postgres(down: float) -> None:
    version, cluster = postgres_cluster()
    _run(["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "stop", "-m", "fast"])
    try:
        time.sleep(down)
    finally:
        _run(["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "start"])


def restart_rabbitmq(down: float) -> None:
    _run(["rabbitmqctl", "-q", "stop_app"])
    try:
        time.sleep(down)
    finally:
        _run(["rabbitmqctl", "-q", "start_app"])


def heal() -> list[str]:
    """Bring every shared service back up; returns what had to be started."""
    started = []
    version, cluster = postgres_cluster()
    status = _run(["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "status"], check=False)
    if status.returncode != 0:
        _run(["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "start"])
        started.append("postgresql")
    if _run(["rabbitmqctl", "-q", "await_startup", "--timeout", "2"], check=False).returncode != 0:
        _run(["rabbitmqctl", "-q", "start_app"])
        started.append("rabbitmq")
    try:
        redis_client(0).ping()
    except redis.RedisError:
        _run(REDIS_START)
        started.append("redis")
    return started


# --- looking at the broker from outside ------------------------------------------------------


def _connection(vhost: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters(
        host=RABBITMQ_HOST, port=RABBITMQ_PORT, virtual_host=vhost,
        credentials=pika.PlainCredentials(RABBITMQ_USER, RABBITMQ_PASSWORD),
        connection_attempts=1, socket_timeout=5, blocked_connection_timeout=10))


def queue_totals(vhost: str) -> dict[str, int]:
    """Messages per queue, ready and unacknowledged together."""
    out = _run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "--no-table-headers", "name", "messages"]).stdout
    totals = {}
    for line in out.splitlines():
        name, _, count = line.rpartition("\t")
        if name:
            totals[name] = int(count)
    return totals


def queue_exists(vhost: str, queue: str) -> bool:
    try:
        connection = _connection(vhost)
    except pika.exceptions.AMQPError:
        return False
    try:
        connection.channel().queue_declare(queue, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        if connection.is_open:
            connection.close()


@dataclass(frozen=True)
class RawMessage:
    message_id: str | None
    correlation_id: str | None
    headers: dict
    body: bytes


def publish_raw(vhost: str, messages: list[tuple[str, RawMessage]]) -> None:
    """Publish (routing_key, message) pairs to the default exchange, persistent, with confirms."""
    connection = _connection(vhost)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for routing_key, message in messages:
            channel.basic_publish("", routing_key, message.body, pika.BasicProperties(
                content_type="application/json", delivery_mode=pika.DeliveryMode.Persistent,
                message_id=message.message_id, correlation_id=message.correlation_id,
                headers=message.headers or None), mandatory=True)
    finally:
        if connection.is_open:
            connection.close()


def take_all(vhost: str, queue: str) -> list[RawMessage]:
    """Take (and ack) every message waiting in a queue."""
    connection = _connection(vhost)
    taken = []
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append(RawMessage(properties.message_id, properties.correlation_id, dict(properties.headers or {}), body))
    finally:
        if connection.is_open:
            connection.close()


def declare_queue(vhost: str, queue: str, *, bind_to: tuple[str, str] | None = None) -> None:
    """A durable queue, optionally bound to (exchange, routing key)."""
    connection = _connection(vhost)
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)
        if bind_to:
            channel.queue_bind(queue, bind_to[0], routing_key=bind_to[1])
    finally:
        connection.close()


def delete_queue(vhost: str, queue: str) -> None:
    connection = _connection(vhost)
    try:
        connection.channel().queue_delete(queue)
    finally:
        connection.close()
