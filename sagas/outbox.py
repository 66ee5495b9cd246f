"""The transactional outbox: messages are written with the transition that decided them and
published afterwards with publisher confirms.

Who publishes a row: its writer first, through the publisher of its runtime (sagas.runtime: the
consumer's `DirectPublisher` on its own connection; a web request hands its rows to the process's
`BackgroundPublisher` and answers at once), then, once the row is
`RELAY_AFTER_SECONDS` old and still unsent (process killed, broker away or slow, row refused), the
relay that every consumer runs between messages. A writer starts no publish past its window, so a
row is never in the hands of its writer and a relay at once; relays skip the rows another relay
has locked. A row the broker would not take waits out a growing delay (`retry_delay`) while the
rows behind it go out; no row is ever dropped."""
import logging
import queue
import threading
from datetime import datetime, timedelta

from django.db import connections, transaction
from django.db.models import Q
from django.utils import timezone

from sagas.broker import (
    COMMANDS_EXCHANGE,
    EVENTS_EXCHANGE,
    PUBLISH_DEADLINE_SECONDS,
    REPLIES_QUEUE,
    Broker,
    BrokerUnavailable,
    Message,
    Refused,
    Unroutable,
    encode,
)
from sagas.engine import Command, Event
from sagas.models import OutboxMessage

log = logging.getLogger(__name__)

RELAY_AFTER_SECONDS = 5.0
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
# rows published together, their confirms awaited within one publish deadline
PUBLISH_ROUND = 50
# a writer must have finished with a row (published, or given up at the deadlines of its round:
# two when the topology is declared again) before the relay may take it; half a second of room
# for the clocks of two processes
_WRITER_WINDOW = timedelta(seconds=RELAY_AFTER_SECONDS - 2 * PUBLISH_DEADLINE_SECONDS - 0.5)

def retry_delay(attempts: int) -> float:
    """Seconds before the next try of a row whose publish has failed `attempts` (>= 1) times."""
    return min(RETRY_FIRST_SECONDS * 2.0 ** min(attempts - 1, 64), RETRY_MAX_SECONDS)


class SentMarker:
    """Marks published rows sent from a background thread, a batch every 0.1 s, so neither a
    request nor a reply waits for that commit. A row published but not yet marked when the
    process dies is sent again by the relay, which participants answer as the same request.
    Its thread starts with the first rows, so after any fork; `stop` marks what is left."""

    def __init__(self):
        self._ids: list[int] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, ids: list[int]) -> None:
        if not ids:
            return
        with self._lock:
            self._ids.extend(ids)
            if self._thread is None and not self._stopping.is_set():
                self._thread = threading.Thread(target=self._run, name="outbox-sent-marker", daemon=True)
                self._thread.start()

    def stop(self, *, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        self.flush()

    def _run(self) -> None:
        try:
            while not self._stopping.wait(0.1):
                self.flush()
                connections.close_all()
        finally:
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


class DirectPublisher:
    """The consumer's publisher: the rows go out at once on its own connection, on its thread."""

    def __init__(self, broker: Broker, *, marker: SentMarker):
        self._broker = broker
        self._marker = marker

    def publish(self, rows: list[OutboxMessage]) -> None:
        sent, _ = _send(rows, self._broker, writer=True)
        self._marker.add(sent)

    def stop(self) -> None:
        pass  # it has no thread; its broker is the consumer's, closed with the runtime


class BackgroundPublisher:
    """The web process's publisher: one thread, one connection, a bounded queue. A request hands
    over the rows it committed and never waits on the broker. What this thread cannot take (queue
    full), could not publish, or reaches past the writer's window is left to the relay. While idle
    it lets the connection exchange heartbeats, so a dead peer is noticed before the next order."""

    def __init__(self, *, broker: Broker | None = None, marker: SentMarker | None = None, capacity: int = 10_000,
                 idle_tick: float = 1.0):
        self._broker = broker or Broker()
        self._marker = marker or SentMarker()
        self._queue: queue.Queue[list[OutboxMessage]] = queue.Queue(maxsize=capacity)
        self._idle_tick = idle_tick
        self._stopping = threading.Event()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def publish(self, rows: list[OutboxMessage]) -> None:
        """Hand over rows committed by this process; the caller does not wait on the broker."""
        self._start()
        try:
            self._queue.put_nowait(rows)
        except queue.Full:
            log.warning("publisher queue full: rows left to the outbox relay", extra={"rows": len(rows)})

    def idle(self) -> bool:
        """Whether every row handed over has been dealt with (published, or left to the relay)."""
        return self._queue.unfinished_tasks == 0

    def stop(self, *, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:  # started by the first request, so after any fork
                self._thread = threading.Thread(target=self._run, name="outbox-publisher", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                batches = [self._queue.get(timeout=self._idle_tick)]
            except queue.Empty:
                self._broker.keep_alive()
                continue
            while len(batches) < 200:
                try:
                    batches.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                sent, _ = _send([row for rows in batches for row in rows], self._broker, writer=True)
                self._marker.add(sent)
            except Exception:  # the thread must not die; the relay has the rows
                log.exception("background publish failed; rows left to the outbox relay")
            finally:
                for _ in batches:
                    self._queue.task_done()
        self._broker.close()


def outbox_row(saga_id: str, message: Command | Event) -> OutboxMessage:
    if isinstance(message, Command):
        return OutboxMessage(
            saga_id=saga_id, exchange=COMMANDS_EXCHANGE, routing_key=message.command, body=message.body()
        )
    return OutboxMessage(saga_id=saga_id, exchange=EVENTS_EXCHANGE, routing_key=message.routing_key, body=message.body)


def _send(rows: list[OutboxMessage], broker: Broker, *, writer: bool = False) -> tuple[list[int], list[OutboxMessage]]:
    """Publish rows in order, in rounds of PUBLISH_ROUND whose confirms are awaited together.
    Returns the ids of those sent and the rows that failed on their own account. A row the broker
    refuses or cannot route does not stop the rows behind it; a lost or stalled connection does
    (they could not go either), and counts against the first row it took down (it may be the
    cause). Not being able to connect counts against no row."""
    try:
        broker.connect()
    except BrokerUnavailable as error:
        log.warning("publish deferred to the outbox relay: %s", error, extra={"rows": len(rows)})
        return [], []
    sent, failed = [], []
    for start in range(0, len(rows), PUBLISH_ROUND):
        round_ = rows[start:start + PUBLISH_ROUND]
        if writer:  # a row past the writer's window is the relay's now
            oldest = timezone.now() - _WRITER_WINDOW
            round_ = [row for row in round_ if row.created_at >= oldest]
        lost = False
        for row, outcome in zip(round_, broker.publish_all([_message(row) for row in round_])):
            if outcome is None:  # confirmed, even behind a row the connection took down
                sent.append(row.pk)
                log.debug("published", extra={"saga_id": str(row.saga_id), "routing_key": row.routing_key,
                                             "attempt": row.body.get("attempt"), "message_id": str(row.message_id)})
                continue
            if not isinstance(outcome, (Unroutable, Refused)):
                if lost:
                    continue
                lost = True
            failed.append(row)
            log.warning("outbox row not published: %s", outcome,
                        extra={"saga_id": str(row.saga_id), "routing_key": row.routing_key, "attempts": row.attempts})
        if lost:
            break
    return sent, failed


def _message(row: OutboxMessage) -> Message:
    is_command = row.exchange == COMMANDS_EXCHANGE
    return Message(exchange=row.exchange, routing_key=row.routing_key, body=encode(row.body),
                   message_id=str(row.message_id), correlation_id=str(row.saga_id),
                   reply_to=REPLIES_QUEUE if is_command else None, mandatory=is_command)


def _mark_sent(ids: list[int]) -> None:
    if ids:
        OutboxMessage.objects.filter(pk__in=ids).update(sent_at=timezone.now())


def _back_off(rows: list[OutboxMessage], *, now: datetime) -> None:
    for row in rows:
        row.attempts += 1
        row.next_attempt_at = now + timedelta(seconds=retry_delay(row.attempts))
    OutboxMessage.objects.bulk_update(rows, ["attempts", "next_attempt_at"])


def relay_pending(*, broker: Broker, older_than: float = RELAY_AFTER_SECONDS, limit: int = 200) -> int:
    """Send the rows their writer did not send, oldest first, leaving out those waiting out a retry
    delay and those another relay has locked. Returns how many were sent."""
    now = timezone.now()
    with transaction.atomic():
        rows = list(
            OutboxMessage.objects.select_for_update(skip_locked=True)
            .filter(sent_at__isnull=True, created_at__lt=now - timedelta(seconds=older_than))
            .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
            .order_by("created_at", "id")[:limit]
        )
        if not rows:
            return 0
        sent, failed = _send(rows, broker)  # while they are locked, so no other relay sends them again
        _mark_sent(sent)
        if failed:
            _back_off(failed, now=timezone.now())
    log.info("outbox relay", extra={"pending": len(rows), "sent": len(sent), "failed": len(failed)})
    return len(sent)
