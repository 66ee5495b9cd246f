"""The service's words, defined once: saga and step statuses, reply statuses, timeline kinds,
staff actions and the failure reasons the engine writes itself.

The engine, the models (their choices are built from these), the API, the admin and the tests
import them from here. Command names are not here: they come from the flow declarations
(sagas.flows). Every enum is a StrEnum, so its members are the strings stored and sent.
"""
from enum import StrEnum


class SagaStatus(StrEnum):
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"


TERMINAL = (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    # we gave up waiting, so it may have happened and must be undone too
    UNKNOWN = "unknown"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"


# steps whose effect may still need undoing
OWED = (StepStatus.SUCCEEDED, StepStatus.UNKNOWN, StepStatus.COMPENSATING)


class ReplyStatus(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"


class ReplyFate(StrEnum):
    """What became of a reply off the bus (services.apply_replies; the metric saga_replies_total)."""

    APPLIED = "applied"
    IGNORED = "ignored"
    DEAD_LETTERED = "dead_lettered"


class TimelineKind(StrEnum):
    STARTED = "started"
    COMMAND = "command"
    REPLY = "reply"
    TIMEOUT = "timeout"
    STAFF = "staff"
    EVENT = "event"
    DEAD_LETTER = "dead_letter"

    @property
    def label(self) -> str:
        return _TIMELINE_LABELS[self]


_TIMELINE_LABELS = {
    TimelineKind.STARTED: "Started", TimelineKind.COMMAND: "command sent", TimelineKind.REPLY: "reply received",
    TimelineKind.TIMEOUT: "deadline passed",
    TimelineKind.STAFF: "staff action", TimelineKind.EVENT: "event published", TimelineKind.DEAD_LETTER: "dead-lettered",
}


class StaffAction(StrEnum):
    COMPENSATE = "compensate"
    RETRY = "retry"
    RESUME = "resume"
    MARK_COMPENSATED = "mark-compensated"


# The engine's own failure reasons (sagas.failure_reasons puts them in words).
STAFF_REASON_PREFIX = "compensated by staff: "
GAVE_UP = " did not succeed: "  # between the compensation that was given up on and why
# event: a participant undid a step that staff had marked undone by hand
UNDONE_TWICE = "saga.undone_twice"


def failed_reason(step_name: str) -> str:
    return f"{step_name}_failed"


def timed_out_reason(step_name: str) -> str:
    return f"{step_name}_timed_out"
