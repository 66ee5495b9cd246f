"""The transactional outbox: messages are written with the transition that decided them and
published afterwards with publisher confirms. A row whose publish did not happen (broker away,
process killed) is sent by `relay_pending`, which every consumer runs between messages."""
import logging
import threading
import time
from datetime import timedelta

from django.db import connections, transaction
from django.utils import timezone

from sagas import messaging
from sagas.engine import Command, Event
from sagas.models import OutboxMessage

log = logging.getLogger(__name__)

_pool = messaging.BrokerPool()
_thread = threading.local()


def use_publisher(publisher) -> None:
    """Publish from this thread through its own broker connection (the consumer's) instead of the pool."""
    _thread.publisher = publisher


class _SentMarker:
    """Marks published rows sent from a background thread, a batch every 0.1 s, so neither a
    request nor a reply waits for that commit. A row published but not yet marked when the
    process dies is sent again by the relay, which participants answer as the same request."""

    def __init__(self):
        self._ids: list[int] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, ids: list[int]) -> None:
        with self._lock:
            self._ids.extend(ids)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="outbox-sent-marker", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(0.1)
            self.flush()
            connections.close_all()

    def flush(self) -> None:
        with self._lock:
            ids, self._ids = self._ids, []
        try:
            _mark_sent(ids)
        except Exception as error:  # marked on a later flush (the thread must not die); the relay may send them again meanwhile
            log.warning("outbox rows not marked sent yet: %r", error, extra={"rows": len(ids)})
            with self._lock:
                self._ids[:0] = ids


_marker = _SentMarker()
flush_sent = _marker.flush


def _current_publisher():
    return getattr(_thread, "publisher", None) or _pool


def outbox_row(saga_id: str, message: Command | Event) -> OutboxMessage:
    if isinstance(message, Command):
        return OutboxMessage(
            saga_id=saga_id, exchange=messaging.COMMANDS_EXCHANGE, routing_key=message.command, body=message.body()
        )
    return OutboxMessage(saga_id=saga_id, exchange=messaging.EVENTS_EXCHANGE, routing_key=message.routing_key, body=message.body)


def publish(rows: list[OutboxMessage], *, mark_now: bool = False) -> int:
    """Publish rows in order and mark them sent (soon, or `mark_now`); stop at the first failure
    (the relay retries)."""
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
            log.debug("published", extra={"saga_id": str(row.saga_id), "routing_key": row.routing_key,
                                         "attempt": row.body.get("attempt"), "message_id": str(row.message_id)})
    except messaging.BrokerUnavailable as error:
        log.warning("publish deferred to the outbox relay: %s", error, extra={"saga_id": str(rows[len(sent)].saga_id)})
    if mark_now:
        _mark_sent(sent)
    elif sent:
        _marker.add(sent)
    return len(sent)


def _mark_sent(ids: list[int]) -> None:
    if ids:
        OutboxMessage.objects.filter(pk__in=ids).update(sent_at=timezone.now())


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
        sent = publish(rows, mark_now=True)  # while they are locked, so no other relay sends them again
    log.info("outbox relay", extra={"pending": len(rows), "sent": sent})
    return sent
