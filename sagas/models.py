"""The record of every saga: its row, its timeline, and the outbox of messages that its
transitions decided to send. Rows change only through sagas.services.

The engine's state and a saga row map onto each other here only (`Saga.row_fields`,
`Saga.engine_state`): the row's columns are what the API, the admin and the indexes read; the
`state` JSON is the engine's whole state, from which a saga Redis lost is rebuilt.
"""
from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import datetime
from datetime import timezone as dt_timezone
from decimal import Decimal

from django.db import models
from django.db.models import Q
from django.utils import timezone as django_timezone

from sagas import engine, flows
from sagas.vocabulary import SagaStatus, TimelineKind


def _choices(name: str, vocabulary) -> type[models.TextChoices]:
    """Django choices from a vocabulary enum; labels are the enum's own, else Django's default."""
    return models.TextChoices(name, [(member.name, (member.value, getattr(member, "label", member.name.title())))
                                     for member in vocabulary])


def moment(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=dt_timezone.utc)


class Saga(models.Model):
    Status = _choices("Status", SagaStatus)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=SagaStatus.RUNNING)
    # the flow this saga started on, and finishes on (sagas.flows registers each version)
    flow_name = models.CharField(max_length=64, default=flows.ORDER_FLOW.name)
    flow_version = models.PositiveIntegerField(default=flows.ORDER_FLOW.version)
    current_step = models.CharField(max_length=32, null=True, blank=True)
    user_id = models.CharField(max_length=128)
    order_id = models.CharField(max_length=128, null=True, blank=True)
    total = models.DecimalField(max_digits=14, decimal_places=2, null=True, blank=True)
    currency = models.CharField(max_length=3)
    items = models.JSONField()
    payment_method = models.CharField(max_length=128, null=True, blank=True)
    failure_reason = models.TextField(null=True, blank=True)
    # the engine's whole state, so a saga Redis has lost is rebuilt from here
    state = models.JSONField()
    version = models.PositiveIntegerField(default=1)
    deadline = models.DateTimeField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    request_fingerprint = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["user_id", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="saga_idempotency_key_per_user",
            )
        ]
        indexes = [
            models.Index(fields=["deadline"], condition=Q(deadline__isnull=False), name="saga_due"),
            models.Index(fields=["status", "-created_at"], name="saga_status_age"),
            models.Index(fields=["current_step", "-created_at"], name="saga_step_age"),
            models.Index(fields=["user_id"], name="saga_user"),
            models.Index(fields=["order_id"], name="saga_order"),
            models.Index(fields=["-created_at"], name="saga_age"),
            models.Index(fields=["-updated_at"], name="saga_last_change"),
            # the support console's counts per status and step, read from the index alone
            models.Index(fields=["status", "current_step"], name="saga_status_step"),
        ]
        permissions = [
            ("compensate_saga", "Can compensate a saga"),
            ("retry_saga", "Can resend a saga's awaited command now"),
            ("resume_saga", "Can resume the compensation of a failed saga"),
            ("mark_step_compensated", "Can mark a saga step compensated by hand"),
        ]

    def __str__(self) -> str:
        return f"saga {self.id} ({self.status})"

    @staticmethod
    def row_fields(state: engine.SagaState) -> dict:
        """The columns a saga row holds for `state` (those a transition writes)."""
        facts = state.facts
        return {
            "status": state.status,
            "current_step": state.current_step,
            "order_id": facts.get("order_id"),
            "total": Decimal(facts["amount"]) if facts.get("amount") is not None else None,
            "failure_reason": state.failure_reason,
            "state": engine.state_to_dict(state),
            "version": state.version,
            "deadline": moment(state.awaiting.deadline) if state.awaiting else None,
            "updated_at": django_timezone.now(),
        }

    @classmethod
    def from_state(cls, state: engine.SagaState, **columns) -> Saga:
        """A new saga row for a saga's first state; `columns`: those the state does not hold."""
        return cls(id=state.saga_id, flow_name=state.flow, flow_version=state.flow_version, **columns,
                   **cls.row_fields(state))

    def engine_state(self) -> engine.SagaState:
        """The state this row records (the record: Redis may be a step behind)."""
        return replace(engine.state_from_dict(self.state), version=self.version)


class TimelineEntry(models.Model):
    Kind = _choices("Kind", TimelineKind)

    saga = models.ForeignKey(Saga, on_delete=models.CASCADE, related_name="timeline")
    at = models.DateTimeField()
    kind = models.CharField(max_length=16, choices=Kind.choices)
    command = models.CharField(max_length=32, blank=True, default="")
    attempt = models.PositiveIntegerField(null=True, blank=True)
    status = models.CharField(max_length=16, blank=True, default="")
    reason = models.TextField(blank=True, default="")
    # what the engine made of it: applied, or why it was ignored
    note = models.TextField(blank=True, default="")
    applied = models.BooleanField(default=True)
    message_id = models.CharField(max_length=255, blank=True, default="")
    redelivered = models.BooleanField(default=False)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    actor = models.CharField(max_length=150, blank=True, default="")
    body = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["saga", "at", "id"]
        verbose_name_plural = "timeline entries"
        constraints = [
            # the inbox: a reply takes effect once, even if redelivered after Redis lost the saga
            models.UniqueConstraint(
                fields=["saga", "command", "attempt"],
                condition=Q(kind="reply", applied=True),
                name="reply_applied_once",
            )
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.command} #{self.attempt}"


class OutboxMessage(models.Model):
    """A message a committed transition decided to send; `sent_at` is set once the broker confirmed it.

    A row the broker would not take (unroutable, nacked, no confirm in time) is never dropped: the
    relay tries it again after a wait that doubles with each of its `attempts`, from
    `next_attempt_at` on, while the rows behind it go out."""

    saga = models.ForeignKey(Saga, on_delete=models.CASCADE, related_name="outbox")
    exchange = models.CharField(max_length=64)
    routing_key = models.CharField(max_length=64)
    message_id = models.UUIDField(default=uuid.uuid4, unique=True)
    body = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)  # failed publishes so far
    next_attempt_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["created_at"], condition=Q(sent_at__isnull=True), name="outbox_unsent")]

    def __str__(self) -> str:
        return f"{self.routing_key} for {self.saga_id}"


from sagas.dead_letter_models import DeadLetter  # noqa: E402,F401  (the dead letters, sagas.dead_letters)
