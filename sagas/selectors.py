"""Read-side queries for the support console. Nothing here changes a saga (see sagas.services)."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from django.db.models import Count, Q, QuerySet

from sagas import engine
from sagas.flow import ORDER_SAGA, StepDefinition
from sagas.models import Saga, TimelineEntry

# The list page reads these columns only: `state` and `items` are JSON documents per row.
LIST_COLUMNS = ("id", "status", "current_step", "user_id", "total", "currency", "deadline", "created_at", "updated_at")
STEP_NAMES = tuple(step.name for step in ORDER_SAGA)


def counts_by(queryset: QuerySet, column: str) -> dict:
    """{value: number of sagas} for one column, in one GROUP BY query over the (filtered) list."""
    rows = queryset.order_by().values(column).annotate(n=Count("pk")).values_list(column, "n")
    return dict(rows)


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


def saga_timeline(saga: Saga) -> list[TimelineEntry]:
    """The saga's timeline, oldest first, each entry's message body as indented JSON for reading."""
    entries = list(saga.timeline.order_by("at", "id"))
    for entry in entries:
        entry.body_json = json.dumps(entry.body, indent=2, sort_keys=True) if entry.body else ""
    return entries


@dataclass(frozen=True)
class DiagramStep:
    position: int
    definition: StepDefinition
    state: engine.StepState
    current: bool
    # the command in flight for this step, if any: the forward one or its compensation
    awaiting: engine.Awaiting | None

    @property
    def compensation_started(self) -> bool:
        return self.state.compensation_attempts > 0


def step_diagram(saga: Saga) -> list[DiagramStep]:
    """The saga's steps in flow order, from the engine state mirrored on the row."""
    state = engine.state_from_dict(saga.state)
    return [
        DiagramStep(
            position=position,
            definition=definition,
            state=state.step(definition.name),
            current=state.current_step == definition.name,
            awaiting=state.awaiting if state.current_step == definition.name else None,
        )
        for position, definition in enumerate(ORDER_SAGA, start=1)
    ]
