"""The saga's rules as pure functions: (state, event, now) -> Decision(new state, messages).

No I/O here. The transitions commit the decision's state and the outbox sends its messages; the
consumer, the API and the admin all come through these functions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

from sagas.flows import ORDER_SAGA, STEP_BY_COMMAND, StepDefinition, build_payload

# saga status
RUNNING, COMPENSATING, COMPLETED, COMPENSATED, FAILED = "running", "compensating", "completed", "compensated", "failed"
TERMINAL = (COMPLETED, COMPENSATED, FAILED)
# step status; UNKNOWN: we gave up waiting, so it may have happened and must be undone too
PENDING, STEP_RUNNING, SUCCEEDED, STEP_FAILED, UNKNOWN = "pending", "running", "succeeded", "failed", "unknown"
STEP_COMPENSATING, STEP_COMPENSATED = "compensating", "compensated"
OWED = (SUCCEEDED, UNKNOWN, STEP_COMPENSATING)  # steps whose effect may still need undoing
# the engine's own failure reasons (sagas.failure_reasons puts them in words)
STAFF_REASON_PREFIX = "compensated by staff: "
GAVE_UP = " did not succeed: "  # between the compensation that was given up on and why
UNDONE_TWICE = "saga.undone_twice"  # event: a participant undid a step that staff had marked undone by hand


def failed_reason(step_name: str) -> str:
    return f"{step_name}_failed"


def timed_out_reason(step_name: str) -> str:
    return f"{step_name}_timed_out"


@dataclass(frozen=True)
class Limits:
    step_timeout: float
    step_max_attempts: int
    compensation_max_attempts: int
    backoff: float = 2.0
    max_wait: float = 300.0


def step_limits(name: str, limits: Limits) -> Limits:
    """The limits of one step: the settings, overridden by the step's own policy in the flow."""
    policy = _definition(name).retry
    overrides = {
        "step_timeout": policy.timeout, "backoff": policy.backoff, "max_wait": policy.max_wait,
        "step_max_attempts": policy.attempts, "compensation_max_attempts": policy.compensation_attempts,
    }
    return replace(limits, **{key: value for key, value in overrides.items() if value is not None})


def wait_after_send(limits: Limits, attempt: int) -> float:
    """How long send number `attempt` of a command waits for its reply: the waits grow by
    `backoff` each send, so a participant slow for minutes does not use up the attempts in seconds."""
    try:
        wait = limits.step_timeout * limits.backoff ** (attempt - 1)
    except OverflowError:
        return limits.max_wait
    return min(wait, limits.max_wait)


@dataclass(frozen=True)
class StepState:
    name: str
    status: str = PENDING
    attempts: int = 0
    compensation_attempts: int = 0
    compensation_limit: int = 0
    # we stopped waiting for the forward reply: a success may still arrive after the undo
    outcome_unknown: bool = False
    # sends of the forward command that staff granted ("retry now") beyond the limit
    granted_attempts: int = 0
    # when the latest compensation of this step was sent, for a person about to mark it by hand
    compensation_sent_at: float | None = None
    # staff recorded that it was undone outside the system: a participant's undo now is a second one
    marked_by_hand: bool = False
    undone_twice: bool = False


@dataclass(frozen=True)
class Awaiting:
    command: str
    attempt: int
    sent_at: float
    deadline: float
    # a compensation answered `failure`: it is sent again at the deadline
    answered: bool = False


@dataclass(frozen=True)
class SagaState:
    saga_id: str
    status: str
    facts: dict
    steps: tuple[StepState, ...]
    awaiting: Awaiting | None = None
    failure_reason: str | None = None
    version: int = 0
    # the reason the saga was being undone, kept while failure_reason says why undoing got stuck
    failure_before_give_up: str | None = None

    def step(self, name: str) -> StepState:
        return next(step for step in self.steps if step.name == name)

    @property
    def current_step(self) -> str | None:
        return STEP_BY_COMMAND[self.awaiting.command].name if self.awaiting else None


@dataclass(frozen=True)
class Command:
    saga_id: str
    command: str
    attempt: int
    payload: dict

    def body(self) -> dict:
        return {"saga_id": self.saga_id, "command": self.command, "attempt": self.attempt, "payload": self.payload}


@dataclass(frozen=True)
class Event:
    routing_key: str
    body: dict


@dataclass(frozen=True)
class Reply:
    command: str
    attempt: int
    status: str  # success | failure
    reason: str | None = None
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    state: SagaState
    messages: tuple[Command | Event, ...] = ()
    # what happened, in words for the timeline; `changed` is False when the event was ignored
    note: str = "applied"
    changed: bool = True


class ActionRefused(Exception):
    """A staff action that the saga's state does not allow; the message says why."""


class StaffAction(StrEnum):
    COMPENSATE = "compensate"
    RETRY = "retry"
    RESUME = "resume"
    MARK_COMPENSATED = "mark-compensated"


@dataclass(frozen=True)
class OutstandingCompensation:
    """A compensation sent with no success back yet: it may still take effect."""

    step: str
    command: str
    sends: int
    last_sent_at: float | None  # None for sagas stored before this was recorded


def _definition(name: str) -> StepDefinition:
    return next(step for step in ORDER_SAGA if step.name == name)


def _with_step(state: SagaState, name: str, **changes) -> SagaState:
    return replace(state, steps=tuple(replace(s, **changes) if s.name == name else s for s in state.steps))


def ignored(state: SagaState, note: str) -> Decision:
    return Decision(state=state, note=note, changed=False)


def _awaiting(command: str, attempt: int, name: str, limits: Limits, now: float) -> Awaiting:
    return Awaiting(command, attempt, now, now + wait_after_send(step_limits(name, limits), attempt))


def _send_forward(state: SagaState, name: str, limits: Limits, now: float) -> tuple[SagaState, Command]:
    definition, attempt = _definition(name), state.step(name).attempts + 1
    state = _with_step(state, name, status=STEP_RUNNING, attempts=attempt)
    state = replace(state, awaiting=_awaiting(definition.command, attempt, name, limits, now))
    return state, Command(state.saga_id, definition.command, attempt, build_payload(definition.payload, state.facts))


def _send_compensation(state: SagaState, name: str, limits: Limits, now: float) -> tuple[SagaState, Command]:
    definition, step = _definition(name), state.step(name)
    attempt = step.compensation_attempts + 1
    limit = step.compensation_limit or step_limits(name, limits).compensation_max_attempts
    state = _with_step(state, name, status=STEP_COMPENSATING, compensation_attempts=attempt, compensation_limit=limit,
                       compensation_sent_at=now)
    state = replace(state, awaiting=_awaiting(definition.compensation, attempt, name, limits, now))
    return state, _compensation_command(state, definition, attempt)


def _compensation_command(state: SagaState, definition: StepDefinition, attempt: int) -> Command:
    return Command(state.saga_id, definition.compensation, attempt, build_payload(definition.compensation_payload, state.facts))


def _event_body(state: SagaState) -> dict:
    facts = state.facts
    return {
        "saga_id": state.saga_id,
        "status": state.status,
        "user_id": facts["user_id"],
        "order_id": facts.get("order_id"),
        "items": facts["items"],
        "total": facts.get("amount"),
        "currency": facts["currency"],
        "failure_reason": state.failure_reason,
    }


def terminal_event(state: SagaState) -> Event:
    return Event(routing_key=f"saga.{state.status}", body=_event_body(state))


def participant_of(command: str) -> str:
    return command.partition(".")[0]


def _finish(state: SagaState, status: str) -> Decision:
    state = replace(state, status=status, awaiting=None)
    return Decision(state=state, messages=(terminal_event(state),))


def _compensate_next(state: SagaState, limits: Limits, now: float) -> Decision:
    """Undo the latest step still owed, or end the saga `compensated` when nothing is owed."""
    state = replace(state, status=COMPENSATING)
    owed = [step for step in reversed(state.steps) if step.status in OWED]
    if not owed:
        return _finish(state, COMPENSATED)
    state, command = _send_compensation(state, owed[0].name, limits, now)
    return Decision(state=state, messages=(command,))


def _advance(state: SagaState, limits: Limits, now: float) -> Decision:
    pending = [step for step in state.steps if step.status == PENDING]
    if not pending:
        return _finish(state, COMPLETED)
    state, command = _send_forward(state, pending[0].name, limits, now)
    return Decision(state=state, messages=(command,))


def start(*, saga_id: str, facts: dict, limits: Limits, now: float) -> Decision:
    state = SagaState(saga_id=saga_id, status=RUNNING, facts=dict(facts), steps=tuple(StepState(s.name) for s in ORDER_SAGA))
    return _advance(state, limits, now)


def on_reply(state: SagaState, reply: Reply, *, limits: Limits, now: float) -> Decision:
    definition = STEP_BY_COMMAND.get(reply.command)
    if definition is None:
        return ignored(state, f"unknown command {reply.command}")
    if reply.command == definition.compensation and reply.status == "success":
        counted = _compensation_success(state, reply, definition, limits, now)
        if counted is not None:
            return counted
    awaited = state.awaiting
    if awaited is None or awaited.command != reply.command or awaited.attempt != reply.attempt:
        return _late_reply(state, reply, definition, now)
    if awaited.answered:
        return ignored(state, "duplicate reply")
    if reply.command == definition.command:
        return _forward_reply(state, reply, definition, limits, now)
    return _compensation_failure(state, reply, definition)


def _compensation_success(state: SagaState, reply: Reply, definition: StepDefinition, limits: Limits,
                          now: float) -> Decision | None:
    """A success to any send of a compensation we made counts: participants answer every send of
    it as the same request, so the earliest success is as good as the awaited one. None: not ours."""
    step = state.step(definition.name)
    if not 1 <= reply.attempt <= step.compensation_attempts:
        return None
    if step.status == STEP_COMPENSATING and state.status in (COMPENSATING, FAILED):
        awaited_here = state.awaiting is not None and state.awaiting.command == reply.command
        exact = awaited_here and state.awaiting.attempt == reply.attempt
        note = "applied" if exact else (
            f"late success of {reply.command} (attempt {reply.attempt}) after the saga failed: undoing carries on"
            if state.status == FAILED else f"success of an earlier send of {reply.command} (attempt {reply.attempt}): counted")
        state = _with_step(_leave_failed(state), definition.name, status=STEP_COMPENSATED)
        if state.awaiting is not None and not awaited_here:
            return Decision(state=state, note=note)
        return replace(_compensate_next(replace(state, awaiting=None), limits, now), note=note)
    if step.status == STEP_COMPENSATED and step.marked_by_hand and not step.undone_twice:
        state = _with_step(state, definition.name, undone_twice=True)
        event = Event(UNDONE_TWICE, {**_event_body(state), "step": definition.name, "command": reply.command})
        return Decision(state=state, messages=(event,), note=f"undone twice: check with {participant_of(reply.command)}")
    return None


def _late_reply(state: SagaState, reply: Reply, definition: StepDefinition, now: float) -> Decision:
    step = state.step(definition.name)
    late_success = reply.command == definition.command and reply.status == "success"
    if late_success and step.outcome_unknown and step.status == STEP_COMPENSATED:
        # The action happened after we gave up on it and undid it: undo it once more.
        attempt = step.compensation_attempts + 1
        state = _with_step(state, step.name, compensation_attempts=attempt, outcome_unknown=False, compensation_sent_at=now)
        command = _compensation_command(state, definition, attempt)
        return Decision(state=state, messages=(command,), note="late success after compensation: compensation sent again")
    if state.status in TERMINAL:
        return ignored(state, f"reply for a {state.status} saga")
    return ignored(state, "reply not awaited (duplicate or stale attempt)")


def _forward_reply(state: SagaState, reply: Reply, definition: StepDefinition, limits: Limits, now: float) -> Decision:
    if reply.status == "success":
        facts = dict(state.facts)
        for data_field, fact in definition.learns:
            facts[fact] = reply.data[data_field]
        state = _with_step(replace(state, facts=facts, awaiting=None), definition.name, status=SUCCEEDED)
        return _advance(state, limits, now)
    state = _with_step(state, definition.name, status=STEP_FAILED)
    state = replace(state, failure_reason=reply.reason or failed_reason(definition.name), awaiting=None)
    return _compensate_next(state, limits, now)


def _compensation_failure(state: SagaState, reply: Reply, definition: StepDefinition) -> Decision:
    step = state.step(definition.name)
    if step.compensation_attempts >= step.compensation_limit:
        return _give_up_compensation(state, definition, reply.reason or "no reason given")
    answered = replace(state.awaiting, answered=True)
    return Decision(state=replace(state, awaiting=answered), note="compensation failed; sent again at its deadline")


def _give_up_compensation(state: SagaState, definition: StepDefinition, why: str) -> Decision:
    state = replace(state, failure_before_give_up=state.failure_reason,
                    failure_reason=f"{definition.compensation}{GAVE_UP}{why}")
    return _finish(state, FAILED)


def _leave_failed(state: SagaState) -> SagaState:
    """A failed saga undoes again: the reason it was being undone comes back."""
    if state.status != FAILED:
        return state
    return replace(state, status=COMPENSATING, failure_reason=state.failure_before_give_up or state.failure_reason,
                   failure_before_give_up=None)


def on_timeout(state: SagaState, *, limits: Limits, now: float) -> Decision:
    """Send the awaited command again, or give up on it, once its deadline has passed."""
    awaited = state.awaiting
    if awaited is None or now < awaited.deadline:
        return ignored(state, "no deadline passed")
    definition = STEP_BY_COMMAND[awaited.command]
    step = state.step(definition.name)
    if awaited.command == definition.command:
        if step.attempts < _forward_limit(step, limits):
            state, command = _send_forward(state, definition.name, limits, now)
            return Decision(state=state, messages=(command,), note=f"no reply in time: {awaited.command} sent again")
        state = _with_step(state, definition.name, status=UNKNOWN, outcome_unknown=True)
        state = replace(state, awaiting=None, failure_reason=timed_out_reason(definition.name))
        return _compensate_next(state, limits, now)
    if step.compensation_attempts < step.compensation_limit:
        state, command = _send_compensation(state, definition.name, limits, now)
        return Decision(state=state, messages=(command,), note=f"no success in time: {awaited.command} sent again")
    return _give_up_compensation(state, definition, f"no success after {step.compensation_attempts} attempts")


def _forward_limit(step: StepState, limits: Limits) -> int:
    return step_limits(step.name, limits).step_max_attempts + step.granted_attempts


# Staff actions. `refusal` says, in a sentence, why the saga's state does not allow one (None: it
# does); each action raises ActionRefused with that sentence.

def refusal(state: SagaState, action: StaffAction, *, step_name: str | None = None) -> str | None:
    if action == StaffAction.COMPENSATE:
        if state.status == COMPENSATING:
            return "This saga is already being compensated."
        if state.status == COMPENSATED:
            return "Nothing is left to undo: every step of this saga is compensated."
        return None
    if action == StaffAction.RETRY:
        if state.awaiting is None:
            return f"This saga is {state.status}: no command is awaited, so there is nothing to retry."
        return None
    if action == StaffAction.RESUME:
        if state.status != FAILED:
            return f"Only a failed saga can resume compensation; this one is {state.status}."
        return None
    if state.status not in (FAILED, COMPENSATING):
        return (f"Steps are marked compensated by hand only while a saga is compensating or failed; "
                f"this one is {state.status}.")
    if step_name is None:  # is there any step it may be done for?
        return None if any(step.status in OWED for step in state.steps) else "No step of this saga is owed."
    if step_name not in {step.name for step in state.steps}:
        return f"This saga has no step {step_name!r}."
    if state.step(step_name).status not in OWED:
        return f"Step {step_name} is {state.step(step_name).status}: nothing of it is owed."
    return None


def refusals(state: SagaState) -> dict[StaffAction, str | None]:
    """Every staff action with the reason the state refuses it, or None where it is allowed."""
    return {action: refusal(state, action) for action in StaffAction}


def _refuse_unless_allowed(state: SagaState, action: StaffAction, **details) -> None:
    sentence = refusal(state, action, **details)
    if sentence:
        raise ActionRefused(sentence)


def compensate(state: SagaState, *, reason: str, limits: Limits, now: float) -> Decision:
    _refuse_unless_allowed(state, StaffAction.COMPENSATE)
    if state.status == FAILED:
        return resume_compensation(state, limits=limits, now=now)
    if state.awaiting is not None:  # a command is in flight: it may still take effect
        state = _with_step(state, state.current_step, status=UNKNOWN, outcome_unknown=True)
    state = replace(state, awaiting=None, failure_reason=f"{STAFF_REASON_PREFIX}{reason}")
    return _compensate_next(state, limits, now)


def retry_now(state: SagaState, *, limits: Limits, now: float) -> Decision:
    """Send the awaited command again now; when its attempts are spent, staff grant one more.
    It never gives up on the step: that is the deadline's decision, or staff's `compensate`."""
    _refuse_unless_allowed(state, StaffAction.RETRY)
    awaited = state.awaiting
    definition = STEP_BY_COMMAND[awaited.command]
    step = state.step(definition.name)
    if awaited.command == definition.command:
        granted = step.attempts >= _forward_limit(step, limits)
        if granted:
            state = _with_step(state, step.name, granted_attempts=step.granted_attempts + 1)
        state, command = _send_forward(state, step.name, limits, now)
    else:
        granted = step.compensation_attempts >= step.compensation_limit
        if granted:
            state = _with_step(state, step.name, compensation_limit=step.compensation_limit + 1)
        state, command = _send_compensation(state, step.name, limits, now)
    note = f"sent again by staff: {command.command}" + (" (one attempt more than the limit, granted by staff)" if granted else "")
    return Decision(state=state, messages=(command,), note=note)


def resume_compensation(state: SagaState, *, limits: Limits, now: float) -> Decision:
    _refuse_unless_allowed(state, StaffAction.RESUME)
    stuck = next(step for step in reversed(state.steps) if step.status in OWED)
    limit = stuck.compensation_attempts + step_limits(stuck.name, limits).compensation_max_attempts
    state = _with_step(_leave_failed(state), stuck.name, compensation_limit=limit)
    state, command = _send_compensation(state, stuck.name, limits, now)
    return Decision(state=state, messages=(command,))


def mark_compensated(state: SagaState, *, step_name: str, limits: Limits, now: float) -> Decision:
    _refuse_unless_allowed(state, StaffAction.MARK_COMPENSATED, step_name=step_name)
    if state.current_step == step_name:
        state = replace(state, awaiting=None)
    state = _with_step(state, step_name, status=STEP_COMPENSATED, marked_by_hand=True)
    if state.awaiting is not None:
        return Decision(state=state)
    stuck = [step.name for step in state.steps if step.status == STEP_COMPENSATING]
    if state.status == FAILED and stuck:
        # the undo that gave up is still owed: sending it again past its attempts is staff's call (resume)
        return Decision(state=state, note=f"{stuck[0]} is still owed and its undo gave up: resume it, or mark it too")
    return _compensate_next(_leave_failed(state), limits, now)


def outstanding_compensations(state: SagaState) -> list[OutstandingCompensation]:
    """Compensations sent with no success back: marking their step by hand risks undoing it twice."""
    outstanding = []
    for step in reversed(state.steps):
        if step.status != STEP_COMPENSATING or not step.compensation_attempts:
            continue
        command = _definition(step.name).compensation
        awaited = state.awaiting if state.awaiting and state.awaiting.command == command else None
        outstanding.append(OutstandingCompensation(step.name, command, step.compensation_attempts,
                                                   awaited.sent_at if awaited else step.compensation_sent_at))
    return outstanding


def compensation_plan(state: SagaState) -> list[Command]:
    """The compensations that `compensate` would send, in order, for a person to confirm."""
    planned = state.steps if state.status != RUNNING else tuple(
        replace(step, status=UNKNOWN) if step.name == state.current_step else step for step in state.steps
    )
    return [
        _compensation_command(state, _definition(step.name), step.compensation_attempts + 1)
        for step in reversed(planned)
        if step.status in OWED
    ]


def state_to_dict(state: SagaState) -> dict:
    return asdict(state)


def state_from_dict(data: dict) -> SagaState:
    """Also reads states stored by earlier versions: a field they lack takes its default."""
    awaiting = data.get("awaiting")
    return SagaState(
        saga_id=data["saga_id"],
        status=data["status"],
        facts=data["facts"],
        steps=tuple(StepState(**step) for step in data["steps"]),
        awaiting=Awaiting(**awaiting) if awaiting else None,
        failure_reason=data.get("failure_reason"),
        version=data.get("version", 0),
        failure_before_give_up=data.get("failure_before_give_up"),
    )
