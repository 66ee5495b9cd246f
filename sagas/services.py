"""Every change of a saga goes through these functions: the API, the consumer and the admin
call them, and none of them edits saga rows directly.

A change is: read the state (Redis, else the database), let the pure engine decide, then in one
database transaction compare-and-set the saga's row on its version, append the timeline and
the outbox rows. Whoever loses the compare-and-set re-reads from the database and decides
again. After the commit the state goes to Redis, the outbox rows to the broker, and a progress
notice to the live pages.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, transaction

from sagas import engine, flows, live, live_state, metrics, outbox, records
from sagas.engine import Decision, Limits, Reply, SagaState
from sagas.models import OutboxMessage, Saga, TimelineEntry, moment

log = logging.getLogger(__name__)


BROKEN_SAGA_RETRY_SECONDS = 60


class SagaNotFound(Exception):
    pass


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


class ConcurrentChange(Exception):
    """Others kept changing the saga while we tried; the caller may try again later."""


class NotInFlow(Exception):
    """A reply for a command the saga's flow does not have (another flow's, or another version's):
    it can never apply to this saga; the message says so, for the dead letter."""


@dataclass(frozen=True)
class Cause:
    """What asked for a change, as the timeline will show it."""

    kind: str
    command: str = ""
    attempt: int | None = None
    status: str = ""
    reason: str = ""
    message_id: str = ""
    redelivered: bool = False
    actor: str = ""
    body: dict | None = None


def saga_limits() -> Limits:
    return Limits(
        step_timeout=settings.SAGA_STEP_TIMEOUT_SECONDS,
        step_max_attempts=settings.SAGA_STEP_MAX_ATTEMPTS,
        compensation_max_attempts=settings.SAGA_COMPENSATION_MAX_ATTEMPTS,
        backoff=settings.SAGA_RETRY_BACKOFF,
        max_wait=settings.SAGA_RETRY_MAX_SECONDS,
    )


def _timeline(saga_id: str, cause: Cause, decision: Decision, before: SagaState | None, now: float) -> list[TimelineEntry]:
    at = moment(now)
    duration = None
    if cause.kind == TimelineEntry.Kind.REPLY and before and before.awaiting and before.awaiting.command == cause.command:
        duration = max(0, int((now - before.awaiting.sent_at) * 1000))
    entries = [
        TimelineEntry(
            saga_id=saga_id, at=at, kind=cause.kind, command=cause.command, attempt=cause.attempt,
            status=cause.status, reason=cause.reason, note=decision.note, applied=decision.changed,
            message_id=cause.message_id, redelivered=cause.redelivered, duration_ms=duration,
            actor=cause.actor, body=cause.body,
        )
    ]
    for message in decision.messages:
        if isinstance(message, engine.Command):
            entries.append(TimelineEntry(saga_id=saga_id, at=at, kind=TimelineEntry.Kind.COMMAND, command=message.command,
                                         attempt=message.attempt, body=message.body()))
        else:
            entries.append(TimelineEntry(saga_id=saga_id, at=at, kind=TimelineEntry.Kind.EVENT,
                                         command=message.routing_key, body=message.body))
    return entries


@dataclass(frozen=True)
class _Change:
    """One decided transition of one saga, to be committed and then announced."""

    saga_id: str
    cause: Cause
    before: SagaState | None
    decision: Decision
    now: float


def _commit(changes: list[_Change]) -> list[OutboxMessage]:
    """Commit the changes in one transaction, each saga's row compare-and-set on its version;
    raises _Lost, rolling all of them back, if any saga moved meanwhile. Returns the outbox rows."""
    with transaction.atomic():
        with records.pipeline():
            saga_rows = [records.update(Saga, {"pk": c.saga_id, "version": c.before.version},
                                        Saga.row_fields(c.decision.state)) for c in changes]
            rows = _append_history(changes)
        if any(row.rowcount != 1 for row in saga_rows):
            raise _Lost()
    return rows


def _append_history(changes: list[_Change]) -> list[OutboxMessage]:
    """The timeline entries and the outbox rows of the changes, inside their transaction."""
    records.insert([e for c in changes for e in _timeline(c.saga_id, c.cause, c.decision, c.before, c.now)])
    return records.insert([outbox.outbox_row(c.saga_id, m) for c in changes for m in c.decision.messages])


def _announce(changes: list[_Change], rows: list[OutboxMessage]) -> None:
    """After the commit: the log lines, the states to Redis, the messages to the broker, the live pages."""
    for change in changes:
        _log_decision(change.cause, change.decision)
        metrics.transition(change.cause.kind, change.before, change.decision)
    live_state.write_states([change.decision.state for change in changes])
    if rows:
        outbox.publish(rows)
    for change in changes:
        live.saga_changed(change.decision.state)


def _log_decision(cause: Cause, decision: Decision) -> None:
    state = decision.state
    log.info(
        decision.note,
        extra={"saga_id": state.saga_id, "cause": cause.kind, "command": cause.command or None, "attempt": cause.attempt,
               "status": state.status, "step": state.current_step, "version": state.version,
               "sends": ",".join(getattr(m, "command", getattr(m, "routing_key", "")) for m in decision.messages) or None},
    )


def start_order_saga(
    *, user_id: str, items: list[dict], currency: str, payment_method: str | None,
    idempotency_key: str | None = None, fingerprint: str = "",
) -> tuple[Saga, bool]:
    """Accept an order: the saga row and its first command are committed together.
    Returns the saga and whether it is new (False: the Idempotency-Key was seen before)."""
    if idempotency_key:
        existing = _replayed(user_id, idempotency_key, fingerprint)
        if existing:
            return existing, False
    saga_id, now = str(uuid.uuid4()), time.time()
    facts = {"user_id": user_id, "items": items, "currency": currency, "payment_method": payment_method}
    decision = engine.start(flows.latest(flows.ORDER_FLOW.name), saga_id=saga_id, facts=facts, limits=saga_limits(),
                            now=now)
    state = replace(decision.state, version=1)
    decision = replace(decision, state=state, note="order accepted")
    cause = Cause(kind=TimelineEntry.Kind.STARTED, actor=user_id, body={"items": items, "currency": currency})
    change = _Change(saga_id, cause, None, decision, now)
    try:
        with transaction.atomic(), records.pipeline():
            [saga] = records.insert([Saga.from_state(
                state, user_id=user_id, currency=currency, items=items, payment_method=payment_method,
                idempotency_key=idempotency_key, request_fingerprint=fingerprint,
            )])
            rows = _append_history([change])
    except IntegrityError:
        existing = idempotency_key and _replayed(user_id, idempotency_key, fingerprint)
        if existing:
            return existing, False
        raise
    _announce([change], rows)
    return saga, True


def _replayed(user_id: str, idempotency_key: str, fingerprint: str) -> Saga | None:
    existing = Saga.objects.filter(user_id=user_id, idempotency_key=idempotency_key).first()
    if existing and existing.request_fingerprint != fingerprint:
        raise IdempotencyConflict(idempotency_key)
    return existing


def load_saga_state(saga_id: str, *, from_database: bool = False) -> SagaState:
    """The saga's live state: from Redis, or rebuilt from the database mirror (and put back)."""
    state = None if from_database else live_state.read_state(saga_id)
    if state is None:
        row = Saga.objects.filter(pk=saga_id).only("state", "version").first()
        if row is None:
            raise SagaNotFound(saga_id)
        state = row.engine_state()
        if not from_database:
            log.info("saga rebuilt from the database", extra={"saga_id": saga_id, "version": state.version})
            metrics.saga_rebuilt()
        live_state.write_state(state)
    return state


def _transition(saga_id: str, decide: Callable[[SagaState, float], Decision], cause: Cause, *,
                record_ignored: bool = True, from_database: bool = False) -> Decision:
    for _ in range(8):
        before = load_saga_state(saga_id, from_database=from_database)
        now = time.time()
        # A current state already tells a reply applied before (it is no longer awaited); the inbox
        # is asked when the state came from the database or the broker says it delivered this before.
        if (from_database or cause.redelivered) and _in_inbox(saga_id, cause):
            decision = engine.ignored(before, "duplicate reply: already applied")
        else:
            decision = decide(before, now)
        if not decision.changed:
            if not from_database and not Saga.objects.filter(pk=saga_id, version=before.version).exists():
                from_database = True  # Redis was behind: judge the event against the record of truth
                continue
            if record_ignored:
                records.insert(_timeline(saga_id, cause, decision, before, now))
                _log_decision(cause, decision)
            return decision
        change = _Change(saga_id, cause, before, _next_version(decision, before), now)
        try:
            rows = _commit([change])
        except (_Lost, IntegrityError):
            from_database = True  # someone else moved the saga, or Redis was behind: decide again
            continue
        _announce([change], rows)
        return change.decision
    raise ConcurrentChange(saga_id)


def _next_version(decision: Decision, before: SagaState) -> Decision:
    return replace(decision, state=replace(decision.state, version=before.version + 1))


class _Lost(Exception):
    pass


def _in_inbox(saga_id: str, cause: Cause) -> bool:
    """Was this reply applied before? (A redelivery after a crash, or after Redis lost the saga.)"""
    return cause.kind == TimelineEntry.Kind.REPLY and TimelineEntry.objects.filter(
        saga_id=saga_id, kind=TimelineEntry.Kind.REPLY, applied=True, command=cause.command, attempt=cause.attempt
    ).exists()


@dataclass(frozen=True)
class IncomingReply:
    saga_id: str
    reply: Reply
    message_id: str = ""
    redelivered: bool = False

    def cause(self) -> Cause:
        reply = self.reply
        return Cause(kind=TimelineEntry.Kind.REPLY, command=reply.command, attempt=reply.attempt, status=reply.status,
                     reason=reply.reason or "", message_id=self.message_id, redelivered=self.redelivered,
                     body={"data": reply.data} if reply.data else None)


def handle_reply(*, saga_id: str, reply: Reply, message_id: str = "", redelivered: bool = False) -> Decision:
    cause = IncomingReply(saga_id, reply, message_id, redelivered).cause()

    def decide(state: SagaState, now: float) -> Decision:
        flow = engine.flow_of(state)
        if flow.step_of(reply.command) is None:
            raise NotInFlow(f"{reply.command} is not a command of flow {flow}, which saga {saga_id} runs on")
        return engine.on_reply(flow, state, reply, limits=saga_limits(), now=now)

    return _transition(saga_id, decide, cause)


def handle_replies(replies: list[IncomingReply]) -> list[bool]:
    """Apply several replies at once: one Redis read, one database transaction, one Redis write.

    Only the plain case is taken: the first reply of each saga, first delivered, that the state in
    Redis awaits. Returns which were applied; every other reply (a saga Redis does not hold, a
    redelivery, a duplicate, a later reply of the same saga, or all of them if any saga moved
    meanwhile) is left to `handle_reply`, to be judged alone, after these, in delivery order."""
    now, limits, seen, changes, applied = time.time(), saga_limits(), set(), [], [False] * len(replies)
    for position, (incoming, before) in enumerate(zip(replies, live_state.read_states([r.saga_id for r in replies]))):
        first_of_saga = incoming.saga_id not in seen
        seen.add(incoming.saga_id)
        if not first_of_saga or before is None or incoming.redelivered:
            continue
        if engine.flow_of(before).step_of(incoming.reply.command) is None:
            continue  # handle_reply says why it is dead-lettered
        decision = engine.on_reply(engine.flow_of(before), before, incoming.reply, limits=limits, now=now)
        if decision.changed:
            changes.append(_Change(incoming.saga_id, incoming.cause(), before, _next_version(decision, before), now))
            applied[position] = True
    if not changes:
        return applied
    try:
        rows = _commit(changes)
    except (_Lost, IntegrityError):
        return [False] * len(replies)
    _announce(changes, rows)
    return applied


def handle_timeout(*, saga_id: str) -> Decision:
    return _transition(saga_id, lambda state, now: engine.on_timeout(engine.flow_of(state), state, limits=saga_limits(),
                                                                    now=now),
                       Cause(kind=TimelineEntry.Kind.TIMEOUT), record_ignored=False)


def handle_due_timeouts(*, limit: int = 200) -> int:
    """Act on every saga whose awaited reply is overdue. Safe with several consumers at once:
    the compare-and-set lets one of them act, the others find the deadline already moved."""
    now = time.time()
    due = Saga.objects.filter(deadline__lte=moment(now)).order_by("deadline").values_list("pk", flat=True)[:limit]
    acted = 0
    for saga_id in due:
        try:
            acted += handle_timeout(saga_id=str(saga_id)).changed
        except (OperationalError, InterfaceError, ConcurrentChange):
            raise
        except Exception:
            # A saga we cannot decide for (a bug, a damaged row) must not stop the others: look
            # again in a minute; it shows as stuck in the console meanwhile.
            log.exception("deadline handling failed", extra={"saga_id": str(saga_id)})
            Saga.objects.filter(pk=saga_id).update(deadline=moment(now + BROKEN_SAGA_RETRY_SECONDS))
    return acted


def _staff_action(saga_id: str, action: str, rule, *, actor: str, reason: str, **details) -> Decision:
    """`rule(flow, state, limits=, now=, **details)`: the engine's staff rule for the action."""
    cause = Cause(kind=TimelineEntry.Kind.STAFF, command=action, actor=actor, reason=reason)
    # a person decides on what the record of truth says, not on a cache that may be behind
    return _transition(saga_id, lambda state, now: rule(engine.flow_of(state), state, limits=saga_limits(), now=now,
                                                        **details),
                       cause, record_ignored=False, from_database=True)


def compensate_saga(*, saga_id: str, actor: str, reason: str) -> Decision:
    return _staff_action(saga_id, "compensate", partial(engine.compensate, reason=reason), actor=actor, reason=reason)


def retry_saga_step(*, saga_id: str, actor: str, reason: str) -> Decision:
    return _staff_action(saga_id, "retry", engine.retry_now, actor=actor, reason=reason)


def resume_saga_compensation(*, saga_id: str, actor: str, reason: str) -> Decision:
    return _staff_action(saga_id, "resume", engine.resume_compensation, actor=actor, reason=reason)


def mark_step_compensated(*, saga_id: str, step_name: str, actor: str, reason: str) -> Decision:
    return _staff_action(saga_id, f"mark {step_name} compensated", engine.mark_compensated, actor=actor, reason=reason,
                         step_name=step_name)


def record_dead_letter(*, saga_id: str | None, reason: str, message_id: str) -> None:
    """Put a dead-lettered reply on its saga's timeline, when it names a saga we know."""
    try:
        known = saga_id and Saga.objects.filter(pk=uuid.UUID(saga_id)).exists()
    except ValueError:
        known = False
    if known:
        TimelineEntry.objects.create(saga_id=saga_id, at=moment(time.time()), kind=TimelineEntry.Kind.DEAD_LETTER,
                                     reason=reason, note="set aside in the dead-letter queue", applied=False,
                                     message_id=message_id)
