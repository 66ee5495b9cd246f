"""The transactional outbox: messages are written with the transition that decided them and
published afterwards with publisher confirms. A row whose publish did not happen (broker away,
process killed) is sent by `relay_pending`, which every consumer runs between messages."""
import logging
import threading
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from sagas import messaging
from sagas.engine import Command, Event
from sagas.models import OutboxMessage

log = logging.getLogger(__name__)

_pool = messaging.BrokerPool()
_thread = threading.local()


def use_publisher(publisher) -> None:
    """Publish from this thread through its own broker connection (the consumer's) instead of the
    pool, and mark rows sent in batches (`flush_sent`) rather than with a commit per message: a row
    sent but not yet marked when the process dies is sent again by the relay, which participants
    answer as the same request."""
    _thread.publisher = publisher
    _thread.unmarked = []


def _current_publisher():
    return getattr(_thread, "publisher", None) or _pool


def outbox_row(saga_id: str, message: Command | Event) -> OutboxMessage:
    if isinstance(message, Command):
        return OutboxMessage(
            saga_id=saga_id, exchange=messaging.COMMANDS_EXCHANGE, routing_key=message.command, body=message.body()
        )
    return OutboxMessage(saga_id=saga_id, exchange=messaging.EVENTS_EXCHANGE, routing_key=message.routing_key, body=message.body)


def publish(rows: list[OutboxMessage]) -> int:
    """Publish rows in order and mark them sent; stop at the first failure (the relay retries)."""
    publisher, sent = _current_publisher(), []
    try:
        for row in rows:
            is_command = row.exchange == messaging.COMMANDS_EXCHANGE
            publisher.publish(
                exchange=row.exchange,
                routing_key=row.routing_key,
                body=messaging.encode(row.body),
                message_id=str(row.message_id),
                correlation_id=str(row.saga_id),
                reply_to=messaging.REPLIES_QUEUE if is_command else None,
                mandatory=is_command,
            )
            sent.append(row.pk)
            log.info("published", extra={"saga_id": str(row.saga_id), "routing_key": row.routing_key,
                                         "attempt": row.body.get("attempt"), "message_id": str(row.message_id)})
    except messaging.BrokerUnavailable as error:
        log.warning("publish deferred to the outbox relay: %s", error, extra={"saga_id": str(rows[len(sent)].saga_id)})
    unmarked = getattr(_thread, "unmarked", None)
    if unmarked is None:
        _mark_sent(sent)
    else:
        unmarked.extend(sent)
    return len(sent)


def _mark_sent(ids: list[int]) -> None:
    if ids:
        OutboxMessage.objects.filter(pk__in=ids).update(sent_at=timezone.now())


def flush_sent() -> None:
    """Mark the rows this thread published since the last flush."""
    unmarked = getattr(_thread, "unmarked", None)
    if unmarked:
        _mark_sent(unmarked)
        unmarked.clear()


def relay_pending(*, older_than: float = 2.0, limit: int = 200) -> int:
    """Send rows that their writer did not send. Rows locked by another relay are skipped."""
    cutoff = timezone.now() - timedelta(seconds=older_than)
    with transaction.atomic():
        rows = list(
            OutboxMessage.objects.select_for_update(skip_locked=True)
            .filter(sent_at__isnull=True, created_at__lt=cutoff)
            .order_by("created_at", "id")[:limit]
        )
        if not rows:
            return 0
        sent = publish(rows)
        flush_sent()  # while the rows are still locked, so no other relay sends them again
    log.info("outbox relay", extra={"pending": len(rows), "sent": sent})
    return sent
