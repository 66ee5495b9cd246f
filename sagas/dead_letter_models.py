"""The dead letters a person settles: each message set aside in saga.replies.dead, filed here by
a consumer (sagas.dead_letters). Imported by sagas.models, so Django sees it as the app's model."""
from django.db import models


class DeadLetter(models.Model):
    class Status(models.TextChoices):
        OPEN = "open"
        REQUEUED = "requeued"
        DISCARDED = "discarded"

    # the message as it was set aside: the bytes, and its headers made JSON (a value JSON has no
    # type for is kept as its text)
    body = models.BinaryField()
    body_sha256 = models.CharField(max_length=64)
    headers = models.JSONField(default=dict, blank=True)
    reason = models.TextField(blank=True, default="")
    message_id = models.CharField(max_length=255, blank=True, default="")
    correlation_id = models.CharField(max_length=255, blank=True, default="")
    # the saga the correlation_id or the body names, when it is one we know (no foreign key:
    # pruning a saga leaves its dead letters for the person who settles them)
    saga_id = models.UUIDField(null=True, blank=True)
    dead_lettered_at = models.DateTimeField()
    filed_at = models.DateTimeField(auto_now_add=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    settled_by = models.CharField(max_length=150, blank=True, default="")
    settled_at = models.DateTimeField(null=True, blank=True)
    note = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["-dead_lettered_at", "-id"]
        indexes = [
            models.Index(fields=["status", "-dead_lettered_at"], name="dead_letter_status"),
            models.Index(fields=["saga_id"], name="dead_letter_saga"),
            models.Index(fields=["body_sha256"], name="dead_letter_body"),
        ]
        permissions = [
            ("requeue_deadletter", "Can send a dead letter back to saga.replies"),
            ("discard_deadletter", "Can discard a dead letter"),
        ]

    def __str__(self) -> str:
        return f"dead letter {self.pk} ({self.status})"
