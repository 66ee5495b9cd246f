"""Every change of a saga goes through these functions: the API, the consumer and the admin
call them, and none of them edits saga rows directly. They say what is asked (the engine's rule
and its cause); sagas.transitions makes the change: read, decide, compare-and-set commit,
announce, for one change or a round of replies alike.

The changes are announced through a runtime (sagas.runtime): the one passed in (the consumer's),
else the process's.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError

from sagas import engine, flows, transitions
from sagas.engine import Decision, Limits, Reply, SagaState
from sagas.models import Saga, TimelineEntry, moment
from sagas.replies import saga_id_of
from sagas.runtime import Runtime
from sagas.runtime import current as current_runtime
from sagas.transitions import Cause, ConcurrentChange, Request, SagaNotFound  # the errors callers catch from here
from sagas.vocabulary import ReplyFate

log = logging.getLogger(__name__)


BROKEN_SAGA_RETRY_SECONDS = 60


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


class NotInFlow(Exception):
    """A reply for a command the saga's flow does not have (another flow's, or another version's):
    it can never apply to this saga; the message says so, for the dead letter."""


def saga_limits() -> Limits:
    return Limits(
        step_timeout=settings.SAGA_STEP_TIMEOUT_SECONDS,
        step_max_attempts=settings.SAGA_STEP_MAX_ATTEMPTS,
        compensation_max_attempts=settings.SAGA_COMPENSATION_MAX_ATTEMPTS,
        backoff=settings.SAGA_RETRY_BACKOFF,
        max_wait=settings.SAGA_RETRY_MAX_SECONDS,
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
    change = transitions.Change(saga_id, cause, None, decision, now)
    saga = Saga.from_state(state, user_id=user_id, currency=currency, items=items, payment_method=payment_method,
                           idempotency_key=idempotency_key, request_fingerprint=fingerprint)
    try:
        rows = transitions.commit_new(saga, change)
    except IntegrityError:
        existing = idempotency_key and _replayed(user_id, idempotency_key, fingerprint)
        if existing:
            return existing, False
        raise
    transitions.announce([change], rows, runtime=current_runtime())
    return saga, True


def _replayed(user_id: str, idempotency_key: str, fingerprint: str) -> Saga | None:
    existing = Saga.objects.filter(user_id=user_id, idempotency_key=idempotency_key).first()
    if existing and existing.request_fingerprint != fingerprint:
        raise IdempotencyConflict(idempotency_key)
    return existing


load_saga_state = transitions.read_state


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


@dataclass(frozen=True)
class ReplyOutcome:
    """What became of one reply: applied; ignored (the note says why); to be dead-lettered (the
    note is the reason); or `fate` None: judging it raised `error` (a bug), nothing was written."""

    fate: ReplyFate | None
    note: str = ""
    error: Exception | None = None


def apply_replies(replies: list[IncomingReply], *, runtime: Runtime | None = None) -> list[ReplyOutcome]:
    """Judge and apply a round of replies together (sagas.transitions); one outcome for each, in
    order. Raises only for an outage (the database)."""
    limits = saga_limits()
    requests = [Request(r.saga_id, r.cause(), partial(_decide_reply, r, limits)) for r in replies]
    results = transitions.apply(requests, runtime=runtime or current_runtime())
    return [_outcome(incoming, result) for incoming, result in zip(replies, results)]


def _decide_reply(incoming: IncomingReply, limits: Limits, state: SagaState, now: float) -> Decision:
    flow = engine.flow_of(state)
    if flow.step_of(incoming.reply.command) is None:
        raise NotInFlow(f"{incoming.reply.command} is not a command of flow {flow}, which saga {incoming.saga_id} runs on")
    return engine.on_reply(flow, state, incoming.reply, limits=limits, now=now)


def _outcome(incoming: IncomingReply, result: transitions.Result) -> ReplyOutcome:
    if isinstance(result.error, SagaNotFound):
        return ReplyOutcome(ReplyFate.DEAD_LETTERED, f"unknown saga {incoming.saga_id}")
    if isinstance(result.error, NotInFlow):
        return ReplyOutcome(ReplyFate.DEAD_LETTERED, str(result.error))
    if result.error is not None:
        return ReplyOutcome(None, error=result.error)
    decision = result.decision
    return ReplyOutcome(ReplyFate.APPLIED if decision.changed else ReplyFate.IGNORED, decision.note)


def _change(saga_id: str, cause: Cause, decide: Callable[[SagaState, float], Decision], *,
            from_record: bool = False, runtime: Runtime | None = None) -> Decision:
    """One change of one saga (a deadline, a staff action): a round of one. What its rule
    raises, the caller gets."""
    [result] = transitions.apply([Request(saga_id, cause, decide, from_record=from_record, record_ignored=False)],
                                 runtime=runtime or current_runtime())
    if result.error is not None:
        raise result.error
    return result.decision


def handle_timeout(*, saga_id: str, runtime: Runtime | None = None) -> Decision:
    return _change(saga_id, Cause(kind=TimelineEntry.Kind.TIMEOUT),
                   lambda state, now: engine.on_timeout(engine.flow_of(state), state, limits=saga_limits(), now=now),
                   runtime=runtime)


def handle_due_timeouts(*, limit: int = 200, runtime: Runtime | None = None) -> int:
    """Act on every saga whose awaited reply is overdue. Safe with several consumers at once:
    the compare-and-set lets one of them act, the others find the deadline already moved."""
    now = time.time()
    due = Saga.objects.filter(deadline__lte=moment(now)).order_by("deadline").values_list("pk", flat=True)[:limit]
    acted = 0
    for saga_id in due:
        try:
            acted += handle_timeout(saga_id=str(saga_id), runtime=runtime).changed
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
    # a person decides on what the record says, not on a cache that may be behind
    return _change(saga_id, cause, lambda state, now: rule(engine.flow_of(state), state, limits=saga_limits(), now=now,
                                                           **details), from_record=True)


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
    saga_id = saga_id_of(saga_id)
    if saga_id and Saga.objects.filter(pk=saga_id).exists():
        TimelineEntry.objects.create(saga_id=saga_id, at=moment(time.time()), kind=TimelineEntry.Kind.DEAD_LETTER,
                                     reason=reason, note="set aside in the dead-letter queue", applied=False,
                                     message_id=message_id)
