"""The one transition path: read -> decide -> compare-and-set commit -> announce, for a round of
changes; a reply, a deadline or a staff action alone is a round of one.

- read: each saga's state from the live state cache, else from the record (and put back);
- decide: the request's rule (the pure engine); a reply applied before (the inbox) is a no-op;
- commit: the round's changes in one transaction, each saga's row compare-and-set on its
  version, with their timeline entries and outbox rows. A decision that changes nothing, made on
  the cache, is checked against the record's version first: a cache that was behind means the
  saga is judged again on the record. A lost compare-and-set rolls the round back, and each of its
  sagas is judged again alone, those that lost on the record;
- announce, after the commit: log, metrics, live state cache, outbox publish, live notice.

A round of N plain replies costs one cache read, one transaction and one cache write.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from django.db import IntegrityError, transaction

from sagas import engine, live_state, metrics, outbox, records
from sagas.engine import Decision, SagaState
from sagas.models import OutboxMessage, Saga, TimelineEntry, moment

if TYPE_CHECKING:
    from sagas.runtime import Runtime

log = logging.getLogger(__name__)

# judging a saga again after a lost compare-and-set, at most this many times in all
MAX_TRIES = 8


class SagaNotFound(Exception):
    pass


class ConcurrentChange(Exception):
    """Others kept changing the saga while we tried; the caller may try again later."""


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


@dataclass(frozen=True)
class Request:
    """A change asked of one saga. `decide(state, now)` is the rule (pure); what it raises is
    the request's result, not the round's."""

    saga_id: str
    cause: Cause
    decide: Callable[[SagaState, float], Decision]
    # judge on the record, not the cache: a person's action, or a saga the cache was behind on
    from_record: bool = False
    # put a decision that changes nothing on the timeline (replies; deadlines and staff do not)
    record_ignored: bool = True


@dataclass(frozen=True)
class Result:
    decision: Decision | None = None
    error: Exception | None = None  # SagaNotFound, ConcurrentChange, or what `decide` raised


@dataclass(frozen=True)
class Change:
    """One decided transition of one saga, to be committed and then announced."""

    saga_id: str
    cause: Cause
    before: SagaState | None
    decision: Decision
    now: float


class _Lost(Exception):
    def __init__(self, saga_ids: set[str]):
        super().__init__(saga_ids)
        self.saga_ids = saga_ids


def apply(requests: list[Request], *, runtime: Runtime) -> list[Result]:
    """The results, in the requests' order. Raises only what the database or the machinery
    raises (an outage). A saga asked twice has its later request judged after the earlier one
    is committed and announced."""
    results: list[Result | None] = [None] * len(requests)
    for wave in _waves(requests):
        for position, result in zip(wave, _apply_round([requests[p] for p in wave], runtime, MAX_TRIES)):
            results[position] = result
    return results


def _waves(requests: list[Request]) -> list[list[int]]:
    """Positions grouped so that no saga is in a group twice: the first request of each saga
    first, in delivery order."""
    waves: list[list[int]] = []
    seen: dict[str, int] = {}
    for position, request in enumerate(requests):
        depth = seen.get(request.saga_id, 0)
        seen[request.saga_id] = depth + 1
        if depth == len(waves):
            waves.append([])
        waves[depth].append(position)
    return waves


def _apply_round(requests: list[Request], runtime: Runtime, tries: int) -> list[Result]:
    if tries == 0:
        return [Result(error=ConcurrentChange(r.saga_id)) for r in requests]
    now = time.time()
    results: list[Result | None] = [None] * len(requests)
    changes, unchanged = [], []  # (position, Change)
    for position, (request, before) in enumerate(zip(requests, _read_states([(r.saga_id, r.from_record) for r in requests]))):
        if isinstance(before, Exception):
            results[position] = Result(error=before)
            continue
        try:
            decision = _decide(request, before, now)
        except Exception as error:  # a refusal (or a bug) of this request's rule: the round goes on
            results[position] = Result(error=error)
            continue
        if decision.changed:
            decision = replace(decision, state=replace(decision.state, version=before.version + 1))
        (changes if decision.changed else unchanged).append((position, Change(request.saga_id, request.cause, before,
                                                                                decision, now)))
    behind = _cache_behind([(requests[p], c) for p, c in unchanged])
    again = [p for p, c in unchanged if c.saga_id in behind]
    unchanged = [(p, c) for p, c in unchanged if c.saga_id not in behind]
    try:
        rows = _commit([c for _, c in changes], [c for p, c in unchanged if requests[p].record_ignored])
    except (_Lost, IntegrityError) as lost:
        # IntegrityError: a saga deleted meanwhile (pruned); the record will say so
        lost_ids = lost.saga_ids if isinstance(lost, _Lost) else {r.saga_id for r in requests}
        again += [p for p, _ in changes + unchanged]
        changes = unchanged = []
    else:
        announce([c for _, c in changes], rows, runtime=runtime)
        for position, change in unchanged:
            if requests[position].record_ignored:
                _log_decision(change.cause, change.decision)
        lost_ids = set()
    for position, change in changes + unchanged:
        results[position] = Result(decision=change.decision)
    for position in again:  # one by one, with the same rules
        request = requests[position]
        from_record = request.from_record or request.saga_id in behind or request.saga_id in lost_ids
        [results[position]] = _apply_round([replace(request, from_record=from_record)], runtime, tries - 1)
    return results


def _decide(request: Request, before: SagaState, now: float) -> Decision:
    # A current state already tells a reply applied before (it is no longer awaited); the inbox
    # is asked when the state came from the record or the broker says it delivered this before.
    if (request.from_record or request.cause.redelivered) and _in_inbox(request.saga_id, request.cause):
        return engine.ignored(before, "duplicate reply: already applied")
    return request.decide(before, now)


def _in_inbox(saga_id: str, cause: Cause) -> bool:
    """Was this reply applied before? (A redelivery after a crash, or after the cache lost the saga.)"""
    return cause.kind == TimelineEntry.Kind.REPLY and TimelineEntry.objects.filter(
        saga_id=saga_id, kind=TimelineEntry.Kind.REPLY, applied=True, command=cause.command, attempt=cause.attempt
    ).exists()


def read_state(saga_id: str) -> SagaState:
    """The saga's live state: from the cache, or rebuilt from the record (and put back)."""
    [state] = _read_states([(saga_id, False)])
    if isinstance(state, SagaNotFound):
        raise state
    return state


def _read_states(asked: list[tuple[str, bool]]) -> list[SagaState | SagaNotFound]:
    """Each (saga id, from the record?)'s state: from the cache (one round trip), else from the
    record (one query), put back in the cache."""
    from_cache = [saga_id for saga_id, from_record in asked if not from_record]
    cached = dict(zip(from_cache, live_state.read_states(from_cache))) if from_cache else {}
    missing = {saga_id for saga_id, _ in asked if cached.get(saga_id) is None}
    recorded = {}
    if missing:
        rows = Saga.objects.filter(pk__in=missing).only("id", "state", "version")
        recorded = {str(row.pk): row.engine_state() for row in rows}
        for saga_id, state in recorded.items():
            if saga_id in cached:
                log.info("saga rebuilt from the database", extra={"saga_id": saga_id, "version": state.version})
                metrics.saga_rebuilt()
        if recorded:
            live_state.write_states(list(recorded.values()))
    return [cached.get(saga_id) or recorded.get(saga_id) or SagaNotFound(saga_id) for saga_id, _ in asked]


def _cache_behind(unchanged: list[tuple[Request, Change]]) -> set[str]:
    """The sagas among these, judged on the cache, whose record has moved on: judge them again
    on the record."""
    judged_on_cache = {c.saga_id: c.before.version for r, c in unchanged if not r.from_record}
    if not judged_on_cache:
        return set()
    recorded = dict(Saga.objects.filter(pk__in=list(judged_on_cache)).values_list("pk", "version"))
    return {saga_id for saga_id, version in judged_on_cache.items() if recorded.get(_uuid(saga_id)) != version}


def _uuid(saga_id: str):
    return Saga._meta.pk.to_python(saga_id)


def _commit(changes: list[Change], ignored: list[Change]) -> list[OutboxMessage]:
    """The changes in one transaction, each saga's row compare-and-set on its version, with the
    timeline of the changes and of the ignored ones; raises _Lost, rolling all of it back, if a
    saga moved meanwhile. Returns the outbox rows."""
    if not changes and not ignored:
        return []
    with transaction.atomic():
        with records.pipeline():
            columns = [Saga.row_fields(c.decision.state) for c in changes]
            updated = records.update(Saga, ["pk", "version"], list(columns[0]) if columns else [],
                                     [[c.saga_id, c.before.version, *values.values()] for c, values in zip(changes, columns)])
            rows = append_history(changes + ignored)
        # (compared as UUIDs: SQLite gives back the stored hex, PostgreSQL a UUID)
        changed = {_uuid(pk) for pk in updated.rows()}
        lost = {c.saga_id for c in changes if _uuid(c.saga_id) not in changed}
        if lost:
            raise _Lost(lost)
    return rows


def commit_new(saga: Saga, change: Change) -> list[OutboxMessage]:
    """A new saga's row with its first timeline entries and outbox rows, in one transaction."""
    with transaction.atomic(), records.pipeline():
        records.insert([saga])
        return append_history([change])


def append_history(changes: list[Change]) -> list[OutboxMessage]:
    """The timeline entries and the outbox rows of the changes, inside their transaction."""
    records.insert([e for c in changes for e in _timeline(c)], with_ids=False)
    return records.insert([outbox.outbox_row(c.saga_id, m) for c in changes for m in c.decision.messages])


def announce(changes: list[Change], rows: list[OutboxMessage], *, runtime: Runtime) -> None:
    """After the commit: the log lines, the metrics, the states to the cache, the messages to the
    runtime's publisher, the notices to the live pages."""
    if not changes:
        return
    for change in changes:
        _log_decision(change.cause, change.decision)
        metrics.transition(change.cause.kind, change.before, change.decision)
    live_state.write_states([change.decision.state for change in changes])
    if rows:
        runtime.publisher.publish(rows)
    for change in changes:
        runtime.live.saga_changed(change.decision.state)


def _timeline(change: Change) -> list[TimelineEntry]:
    saga_id, cause, decision, before, now = change.saga_id, change.cause, change.decision, change.before, change.now
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


def _log_decision(cause: Cause, decision: Decision) -> None:
    state = decision.state
    log.info(
        decision.note,
        extra={"saga_id": state.saga_id, "cause": cause.kind, "command": cause.command or None, "attempt": cause.attempt,
               "status": state.status, "step": state.current_step, "version": state.version,
               "sends": ",".join(getattr(m, "command", getattr(m, "routing_key", "")) for m in decision.messages) or None},
    )
