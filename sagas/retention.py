"""Bounded growth: finished sagas, with their timeline and sent outbox rows, are deleted
once they are older than the operator's retention (`manage.py prune_sagas`).

Completed and compensated sagas are done with. Failed sagas wait for a person, so they are kept
unless asked for. A saga with an outbox row not yet sent is never deleted: that message must
still go out. Deleting a saga also forgets its Idempotency-Key: a client repeating it after the
retention starts a new saga.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.db.models import Exists, OuterRef, Q, QuerySet

from sagas.models import OutboxMessage, Saga, TimelineEntry

DONE_WITH = (Saga.Status.COMPLETED, Saga.Status.COMPENSATED)


@dataclass(frozen=True)
class Pruned:
    sagas: int = 0
    timeline_entries: int = 0
    outbox_messages: int = 0

    def __add__(self, other: Pruned) -> Pruned:
        return Pruned(self.sagas + other.sagas, self.timeline_entries + other.timeline_entries,
                      self.outbox_messages + other.outbox_messages)


def prunable_statuses(*, include_failed: bool) -> tuple[str, ...]:
    return (*DONE_WITH, Saga.Status.FAILED) if include_failed else DONE_WITH


def prunable_sagas(*, finished_before: datetime, include_failed: bool = False) -> QuerySet:
    """Finished sagas whose last change is older than `finished_before` and that have nothing left to send."""
    unsent = OutboxMessage.objects.filter(saga=OuterRef("pk"), sent_at__isnull=True)
    return (Saga.objects.filter(status__in=prunable_statuses(include_failed=include_failed), updated_at__lt=finished_before)
            .exclude(Exists(unsent)))


def count_prunable(*, finished_before: datetime, include_failed: bool = False) -> Pruned:
    """What `prune_finished_sagas` would delete now (the dry run)."""
    sagas = prunable_sagas(finished_before=finished_before, include_failed=include_failed).values("pk")
    return Pruned(
        sagas=sagas.count(),
        timeline_entries=TimelineEntry.objects.filter(saga__in=sagas).count(),
        outbox_messages=OutboxMessage.objects.filter(saga__in=sagas).count(),
    )


def prune_finished_sagas(*, finished_before: datetime, include_failed: bool = False, batch_size: int = 500,
                         on_batch: Callable[[Pruned, Pruned], None] = lambda batch, total: None) -> Pruned:
    """Delete the prunable sagas, oldest first, one transaction per `batch_size` sagas; calls
    `on_batch(batch, total so far)` after each. Returns the total."""
    total, cursor = Pruned(), None
    while True:
        with transaction.atomic():
            candidates = prunable_sagas(finished_before=finished_before, include_failed=include_failed)
            if cursor is not None:  # keyset paging: a saga skipped below is not looked at again
                candidates = candidates.filter(Q(updated_at__gt=cursor[0]) | Q(updated_at=cursor[0], pk__gt=cursor[1]))
            # a saga a transition holds locked is changing: leave it to the next run
            locked = list(candidates.order_by("updated_at", "pk").select_for_update(skip_locked=True, of=("self",))
                          .values_list("updated_at", "pk")[:batch_size])
            if not locked:
                return total
            cursor = locked[-1]
            # asked again in a statement of its own, now that the rows are locked: a transition that
            # committed since the first look (a late reply, a staff action) has moved the saga
            batch_ids = list(prunable_sagas(finished_before=finished_before, include_failed=include_failed)
                             .filter(pk__in=[pk for _, pk in locked]).values_list("pk", flat=True))
            batch = _delete(batch_ids)
        total += batch
        on_batch(batch, total)


def _delete(saga_ids: list) -> Pruned:
    if not saga_ids:
        return Pruned()
    _, per_model = Saga.objects.filter(pk__in=saga_ids).only("pk").delete()
    return Pruned(
        sagas=per_model.get(Saga._meta.label, 0),
        timeline_entries=per_model.get(TimelineEntry._meta.label, 0),
        outbox_messages=per_model.get(OutboxMessage._meta.label, 0),
    )
