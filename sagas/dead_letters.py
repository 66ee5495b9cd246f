"""Dead letters a person can settle. saga.replies.dead stays where poison goes; a consumer files
what arrives there into the DeadLetter table (`file_from_queue`, from its tick), acking each
message only once its row is committed, so a crash in between files it again rather than
losing it (a redelivered message already filed and still open is acked without a second row).

From the console or `manage.py dead_letters`, a permitted person then requeues one (its body goes
back to saga.replies, as the participant sent it) or discards it; each settles the row once,
with who and when.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import math
import time
import uuid

from django.conf import settings
from django.db import DatabaseError, close_old_connections, transaction
from django.db.models import QuerySet
from django.utils import timezone

from sagas.broker import (
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_REASON,
    MAX_REASON_CHARS,
    REPLIES_QUEUE,
    Broker,
    BrokerUnavailable,
    Delivery,
)
from sagas.dead_letter_models import DeadLetter
from sagas.models import Saga
from sagas.replies import MAX_REPLY_BYTES, escaped_text, saga_id_of

# A reply over MAX_REPLY_BYTES is poison whatever it holds (parse_reply refuses it unread): of such
# a body only the start is kept, for a person to see, so a flood of huge messages costs neither the
# consumer's memory nor the database's disk; it cannot be requeued, only discarded.
TRUNCATED = "x-body-truncated"

log = logging.getLogger(__name__)

FILE_LIMIT = 100
# headers of ours that a requeued reply must not carry: the reason it was set aside, and the
# tries count (a requeued reply starts its tries afresh)
OUR_HEADERS = (DEAD_LETTER_REASON, "x-saga-handler-tries", "x-saga-handler-tries-signature")


class NotOpen(Exception):
    """The dead letter was settled already (by someone else, or before); the message says how."""


def json_headers(headers: dict) -> dict:
    """The headers as JSON can hold them: text, numbers, booleans, lists and tables as they are;
    bytes as base64 text, anything else (a timestamp, a decimal) as its text."""
    def convert(value):
        if isinstance(value, str):
            return escaped_text(value, limit=len(value) * 4)
        if value is None or isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value)):
            return value
        if isinstance(value, (bytes, bytearray)):
            return {"base64": base64.b64encode(bytes(value)).decode()}
        if isinstance(value, dict):
            return {convert(str(key)): convert(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(item) for item in value]
        return str(value)

    return convert(headers)


def _saga_named(delivery: Delivery) -> uuid.UUID | None:
    """The known saga the correlation_id, else the body's saga_id, names."""
    candidates = [delivery.correlation_id]
    try:
        body = json.loads(delivery.body) if len(delivery.body) <= MAX_REPLY_BYTES else None
        if isinstance(body, dict):
            candidates.append(body.get("saga_id"))
    except (ValueError, RecursionError):
        pass
    for saga_id in map(saga_id_of, candidates):
        if saga_id and Saga.objects.filter(pk=saga_id).exists():
            return uuid.UUID(saga_id)
    return None


def file_delivery(delivery: Delivery) -> DeadLetter | None:
    """The DeadLetter row of one message of saga.replies.dead, committed; None when this very
    message is filed and open already (a redelivery after a crash between commit and ack)."""
    body = bytes(delivery.body)
    digest = hashlib.sha256(body).hexdigest()
    headers = json_headers(delivery.headers)
    if len(body) > MAX_REPLY_BYTES:
        headers[TRUNCATED] = f"{len(body)} bytes; the first {MAX_REPLY_BYTES} are kept"
        body = body[:MAX_REPLY_BYTES]
    reason = delivery.headers.get(DEAD_LETTER_REASON)
    reason = escaped_text(reason if isinstance(reason, str) else "no reason given", MAX_REASON_CHARS)
    message_id = escaped_text(delivery.message_id)
    at = (dt.datetime.fromtimestamp(delivery.timestamp, tz=dt.timezone.utc) if delivery.timestamp is not None
          and 0 < delivery.timestamp < 253402300800 else timezone.now())
    same = DeadLetter.objects.filter(body_sha256=digest, message_id=message_id, reason=reason, status=DeadLetter.Status.OPEN)
    if delivery.timestamp is not None:
        same = same.filter(dead_lettered_at=at)
    with transaction.atomic():
        if same.exists():
            return None
        return DeadLetter.objects.create(
            body=body, body_sha256=digest, headers=headers, reason=reason,
            message_id=message_id, correlation_id=escaped_text(delivery.correlation_id), saga_id=_saga_named(delivery),
            dead_lettered_at=at,
        )


def file_from_queue(broker: Broker, *, limit: int = FILE_LIMIT) -> int:
    """Move up to `limit` messages from saga.replies.dead into the table, each acked after its row
    is committed. Returns how many messages the queue still holds."""
    return broker.take(DEAD_LETTER_QUEUE, file_delivery, limit=limit)


class Filing:
    """The consumer's filing of dead letters, at most every DEAD_LETTER_FILE_EVERY_SECONDS (0:
    never). Nothing that goes wrong here stops the consumer's loop: the messages stay in the queue
    until the next try."""

    def __init__(self):
        self._next = 0.0

    def maybe_file(self, broker: Broker) -> None:
        every, now = settings.DEAD_LETTER_FILE_EVERY_SECONDS, time.monotonic()
        if not every or now < self._next:
            return
        self._next = now + every
        from sagas import metrics

        try:
            metrics.sampler.dead_letters_in_queue = file_from_queue(broker)
        except BrokerUnavailable as error:  # the consume loop reconnects
            log.warning("dead letters not filed: %s", error)
        except DatabaseError as error:
            close_old_connections()
            log.warning("dead letters not filed: %r", error)
        except Exception:
            log.exception("dead letters not filed")


filing = Filing()


def file_due(broker: Broker) -> None:
    """Hook: the consumer's tick."""
    filing.maybe_file(broker)


def open_dead_letters() -> QuerySet:
    return DeadLetter.objects.filter(status=DeadLetter.Status.OPEN)


def _settle(dead_letter_id: int, *, status: str, actor: str, note: str, before_commit=None) -> DeadLetter:
    with transaction.atomic():
        row = DeadLetter.objects.select_for_update().filter(pk=dead_letter_id).first()
        if row is None:
            raise DeadLetter.DoesNotExist(f"no dead letter {dead_letter_id}")
        if row.status != DeadLetter.Status.OPEN:
            raise NotOpen(f"dead letter {row.pk} was {row.status} by {row.settled_by or 'someone'} at {row.settled_at}")
        if before_commit is not None:
            before_commit(row)  # raising leaves the row open
        row.status, row.settled_by, row.settled_at, row.note = status, actor[:150], timezone.now(), note
        row.save(update_fields=["status", "settled_by", "settled_at", "note"])
    return row


def requeue_dead_letter(*, dead_letter_id: int, actor: str, note: str = "", broker: Broker | None = None) -> DeadLetter:
    """Send the body back to saga.replies, as it was sent (message_id, correlation_id and the
    sender's headers, without ours), and mark the row requeued. The publish happens while the
    row is locked and before it is marked: if it fails, the row stays open."""
    def publish(row: DeadLetter) -> None:
        if TRUNCATED in row.headers:
            raise NotOpen(f"Only the start of this message was kept ({row.headers[TRUNCATED]}): it was over the "
                          f"size limit, so it can never be applied. Discard it.")
        own_broker = broker or Broker()
        try:
            own_broker.publish(exchange="", routing_key=REPLIES_QUEUE, body=bytes(row.body),
                               message_id=row.message_id or None, correlation_id=row.correlation_id or None,
                               headers={k: v for k, v in row.headers.items() if k not in OUR_HEADERS})
        finally:
            if broker is None:
                own_broker.close()

    return _settle(dead_letter_id, status=DeadLetter.Status.REQUEUED, actor=actor, note=note, before_commit=publish)


def discard_dead_letter(*, dead_letter_id: int, actor: str, note: str = "") -> DeadLetter:
    return _settle(dead_letter_id, status=DeadLetter.Status.DISCARDED, actor=actor, note=note)


ACTIONS = {
    "requeue": ("sagas.requeue_deadletter", requeue_dead_letter, "Requeued to saga.replies"),
    "discard": ("sagas.discard_deadletter", discard_dead_letter, "Discarded"),
}


def settle_by(*, user, action: str, dead_letter_id: int, note: str = "", broker: Broker | None = None) -> DeadLetter:
    """Requeue or discard a dead letter as `user` (a Django user holding the action's permission),
    written to the admin history like the saga actions. Raises PermissionDenied, NotOpen,
    DeadLetter.DoesNotExist or BrokerUnavailable (the row then stays open)."""
    from django.contrib.admin.models import CHANGE, LogEntry
    from django.core.exceptions import PermissionDenied

    permission, settle, label = ACTIONS[action]
    if not (user.is_active and user.has_perm(permission)):
        raise PermissionDenied(f"{user.get_username()} lacks the permission {permission}")
    arguments = {"broker": broker} if action == "requeue" else {}
    row = settle(dead_letter_id=dead_letter_id, actor=user.get_username(), note=note, **arguments)
    LogEntry.objects.log_actions(user_id=user.pk, queryset=[row], action_flag=CHANGE, single_object=True,
                                 change_message=f"{label} by {user.get_username()}. Reason: {note or 'none given'}.")
    log.info("dead letter settled", extra={"dead_letter": row.pk, "status": row.status, "actor": user.get_username(),
                                           "saga_id": str(row.saga_id) if row.saga_id else None})
    return row


def prune_settled(*, settled_before) -> int:
    """Delete the requeued and discarded dead letters settled before `settled_before`; open ones stay."""
    deleted, _ = DeadLetter.objects.exclude(status=DeadLetter.Status.OPEN).filter(settled_at__lt=settled_before).delete()
    return deleted
