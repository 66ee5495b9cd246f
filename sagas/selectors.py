"""Read-side queries for the support console. Nothing here changes a saga (see sagas.services)."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from django.db.models import Count, Q, QuerySet

from sagas import engine, flows
from sagas.flows import StepDefinition
from sagas.models import Saga, TimelineEntry
from sagas.vocabulary import OWED, SagaStatus, StepStatus

# The list page reads these columns only: `state` and `items` are JSON documents per row.
LIST_COLUMNS = ("id", "status", "current_step", "user_id", "total", "currency", "deadline", "created_at", "updated_at")
STEP_NAMES = tuple(dict.fromkeys(step.name for flow in flows.registered() for step in flow.steps))


def counts_by_status_and_step(queryset: QuerySet) -> dict[tuple[str, str | None], int]:
    """{(status, current step): number of sagas} of the (filtered) list, in one GROUP BY that the
    index saga_status_step answers without reading the rows."""
    rows = queryset.order_by().values("status", "current_step").annotate(n=Count("*"))
    return {(row["status"], row["current_step"]): row["n"] for row in rows}


def stuck_condition(now) -> Q:
    """A saga someone should look at: its awaited reply is overdue, or its compensation gave up."""
    return Q(deadline__lt=now) | Q(status=Saga.Status.FAILED)


def search_condition(term: str) -> Q | None:
    """Exact matches on indexed columns: a saga id, a customer's user id or an order id."""
    term = term.strip()
    if not term:
        return None
    condition = Q(user_id=term) | Q(order_id=term)
    try:
        condition |= Q(pk=uuid.UUID(term))
    except ValueError:
        pass
    return condition


def sagas_with_order(saga: Saga) -> list[Saga]:
    """Other sagas that carry the same order id (a re-sent order, a duplicate, a manual retry)."""
    if not saga.order_id:
        return []
    return list(Saga.objects.filter(order_id=saga.order_id).exclude(pk=saga.pk).only(*LIST_COLUMNS)[:20])


TIMELINE_PAGE_SIZE = 200


@dataclass(frozen=True)
class TimelinePage:
    entries: list[TimelineEntry]  # oldest first
    number: int  # 1 is the newest entries; higher numbers go back in time
    pages: int
    total: int


def saga_timeline(saga: Saga, *, page: int = 1, per_page: int = TIMELINE_PAGE_SIZE) -> TimelinePage:
    """One page of the saga's timeline: page 1 holds the newest `per_page` entries, page 2 the
    ones before them, and so on; each page reads oldest first. Each entry's message body comes
    as indented JSON for reading. A page past the last is the last (the oldest entries)."""
    total = saga.timeline.count()
    pages = max(1, -(-total // per_page))
    number = min(max(1, page), pages)
    newest_first = saga.timeline.order_by("-at", "-id")[(number - 1) * per_page:number * per_page]
    entries = list(reversed(newest_first))
    for entry in entries:
        entry.body_json = json.dumps(entry.body, indent=2, sort_keys=True) if entry.body else ""
    return TimelinePage(entries=entries, number=number, pages=pages, total=total)


@dataclass(frozen=True)
class DiagramStep:
    position: int
    definition: StepDefinition
    state: engine.StepState
    current: bool
    # the command in flight for this step, if any: the forward one or its compensation
    awaiting: engine.Awaiting | None
    # where undoing this step stands, in words; None when there is nothing of it to undo
    undo: str | None


def _undo(saga: engine.SagaState, step: engine.StepState) -> str | None:
    if step.status == StepStatus.COMPENSATED:
        return "done"
    if step.status == StepStatus.COMPENSATING:
        attempts = f"{step.compensation_attempts} attempt{'s' if step.compensation_attempts != 1 else ''}"
        return f"gave up after {attempts}" if saga.status == SagaStatus.FAILED else f"in flight, {attempts}"
    return "owed" if step.status in OWED else None


def step_diagram(state: engine.SagaState) -> list[DiagramStep]:
    """The saga's steps in flow order, from the engine state its row records."""
    return [
        DiagramStep(
            position=position,
            definition=definition,
            state=state.step(definition.name),
            current=state.current_step == definition.name,
            awaiting=state.awaiting if state.current_step == definition.name else None,
            undo=_undo(state, state.step(definition.name)),
        )
        for position, definition in enumerate(engine.flow_of(state).steps, start=1)
    ]
