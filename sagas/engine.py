"""The saga's rules as pure functions: (flow, state, event, now) -> Decision(new state, messages).

No I/O here. The transitions commit the decision's state and the outbox sends its messages; the
consumer, the API and the admin all come through these functions. Every function takes the flow
(sagas.flows) the saga runs on: the saga's own version, not necessarily the newest.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from sagas import flows
from sagas.flows import Flow, StepDefinition, build_payload, participant_of
from sagas.vocabulary import (
    GAVE_UP,
    OWED,
    STAFF_REASON_PREFIX,
    TERMINAL,
    UNDONE_TWICE,
    ReplyStatus,
    SagaStatus,
    StaffAction,
    StepStatus,
    failed_reason,
    timed_out_reason,
)

__all__ = ["participant_of", "StaffAction"]  # re-exported for the callers that speak of both


@dataclass(frozen=True)
class Limits:
    step_timeout: float
    step_max_attempts: int
    compensation_max_attempts: int
    backoff: float = 2.0
    max_wait: float = 300.0


def step_limits(definition: StepDefinition, limits: Limits) -> Limits:
    """The limits of one step: the settings, overridden by the step's own policy in the flow."""
    policy = definition.retry
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
    status: StepStatus = StepStatus.PENDING
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
    step: str  # the step whose command (forward or compensation) this is
    command: str
    attempt: int
    sent_at: float
    deadline: float
    # a compensation answered `failure`: it is sent again at the deadline
    answered: bool = False


@dataclass(frozen=True)
class SagaState:
    saga_id: str
    status: SagaStatus
    facts: dict
    steps: tuple[StepState, ...]
    awaiting: Awaiting | None = None
    failure_reason: str | None = None
    version: int = 0
    # the reason the saga was being undone, kept while failure_reason says why undoing got stuck
    failure_before_give_up: str | None = None
    # the flow (name, version) the saga started on, and finishes on
    flow: str = flows.ORDER_FLOW.name
    flow_version: int = flows.ORDER_FLOW.version
    # when the order was accepted (epoch seconds; None in states stored before it was kept)
    started_at: float | None = None

    def step(self, name: str) -> StepState:
        return next(step for step in self.steps if step.name == name)

    @property
    def current_step(self) -> str | None:
        return self.awaiting.step if self.awaiting else None


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
    status: ReplyStatus
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


@dataclass(frozen=True)
class OutstandingCompensation:
    """A compensation sent with no success back yet: it may still take effect."""

    step: str
    command: str
    sends: int
    last_sent_at: float | None  # None for sagas stored before this was recorded


def flow_of(state: SagaState) -> Flow:
    """The flow the saga runs on (raises flows.UnknownFlow if that version was removed too early)."""
    return flows.get(state.flow, state.flow_version)


def _with_step(state: SagaState, name: str, **changes) -> SagaState:
    return replace(state, steps=tuple(replace(s, **changes) if s.name == name else s for s in state.steps))


def ignored(state: SagaState, note: str) -> Decision:
    return Decision(state=state, note=note, changed=False)


def _awaiting(command: str, attempt: int, definition: StepDefinition, limits: Limits, now: float) -> Awaiting:
    return Awaiting(definition.name, command, attempt, now, now + wait_after_send(step_limits(definition, limits), attempt))


def _send_forward(state: SagaState, definition: StepDefinition, limits: Limits, now: float) -> tuple[SagaState, Command]:
    attempt = state.step(definition.name).attempts + 1
    state = _with_step(state, definition.name, status=StepStatus.RUNNING, attempts=attempt)
    state = replace(state, awaiting=_awaiting(definition.command, attempt, definition, limits, now))
    return state, Command(state.saga_id, definition.command, attempt, build_payload(definition.payload, state.facts))


def _send_compensation(state: SagaState, definition: StepDefinition, limits: Limits,
                       now: float) -> tuple[SagaState, Command]:
    step = state.step(definition.name)
    attempt = step.compensation_attempts + 1
    limit = step.compensation_limit or step_limits(definition, limits).compensation_max_attempts
    state = _with_step(state, definition.name, status=StepStatus.COMPENSATING, compensation_attempts=attempt,
                       compensation_limit=limit, compensation_sent_at=now)
    state = replace(state, awaiting=_awaiting(definition.compensation, attempt, definition, limits, now))
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


def _finish(state: SagaState, status: SagaStatus) -> Decision:
    state = replace(state, status=status, awaiting=None)
    return Decision(state=state, messages=(terminal_event(state),))


def _compensate_next(flow: Flow, state: SagaState, limits: Limits, now: float) -> Decision:
    """Undo the latest step still owed, or end the saga `compensated` when nothing is owed."""
    state = replace(state, status=SagaStatus.COMPENSATING)
    owed = [step for step in reversed(state.steps) if step.status in OWED]
    if not owed:
        return _finish(state, SagaStatus.COMPENSATED)
    state, command = _send_compensation(state, flow.step(owed[0].name), limits, now)
    return Decision(state=state, messages=(command,))


def _advance(flow: Flow, state: SagaState, limits: Limits, now: float) -> Decision:
    pending = [step for step in state.steps if step.status == StepStatus.PENDING]
    if not pending:
        return _finish(state, SagaStatus.COMPLETED)
    state, command = _send_forward(state, flow.step(pending[0].name), limits, now)
    return Decision(state=state, messages=(command,))


def start(flow: Flow, *, saga_id: str, facts: dict, limits: Limits, now: float) -> Decision:
    state = SagaState(saga_id=saga_id, status=SagaStatus.RUNNING, facts=dict(facts),
                      steps=tuple(StepState(s.name) for s in flow.steps), flow=flow.name, flow_version=flow.version,
                      started_at=now)
    return _advance(flow, state, limits, now)


def on_reply(flow: Flow, state: SagaState, reply: Reply, *, limits: Limits, now: float) -> Decision:
    definition = flow.step_of(reply.command)
    if definition is None:
        return ignored(state, f"{reply.command} is not a command of flow {flow}")
    if reply.command == definition.compensation and reply.status == ReplyStatus.SUCCESS:
        counted = _compensation_success(flow, state, reply, definition, limits, now)
        if counted is not None:
            return counted
    awaited = state.awaiting
    if awaited is None or awaited.command != reply.command or awaited.attempt != reply.attempt:
        return _late_reply(flow, state, reply, definition, limits, now)
    if awaited.answered:
        return ignored(state, "duplicate reply")
    if reply.command == definition.command:
        return _forward_reply(flow, state, reply, definition, limits, now)
    return _compensation_failure(state, reply, definition)


def _compensation_success(flow: Flow, state: SagaState, reply: Reply, definition: StepDefinition, limits: Limits,
                          now: float) -> Decision | None:
    """A success to any send of a compensation we made counts: participants answer every send of
    it as the same request, so the earliest success is as good as the awaited one. None: not ours.
    A success for a step staff marked compensated by hand is flagged "undone twice", once."""
    step = state.step(definition.name)
    if not 1 <= reply.attempt <= step.compensation_attempts:
        return None
    awaited_here = state.awaiting is not None and state.awaiting.command == reply.command
    if step.status == StepStatus.COMPENSATING and state.status in (SagaStatus.COMPENSATING, SagaStatus.FAILED):
        exact = awaited_here and state.awaiting.attempt == reply.attempt
        note = "applied" if exact else (
            f"late success of {reply.command} (attempt {reply.attempt}) after the saga failed: undoing carries on"
            if state.status == SagaStatus.FAILED
            else f"success of an earlier send of {reply.command} (attempt {reply.attempt}): counted")
        state = _with_step(_leave_failed(state), definition.name, status=StepStatus.COMPENSATED)
        if state.awaiting is not None and not awaited_here:
            decision = Decision(state=state, note=note)
        else:
            decision = replace(_compensate_next(flow, replace(state, awaiting=None), limits, now), note=note)
    elif step.status == StepStatus.COMPENSATING and state.status == SagaStatus.COMPENSATED:
        # the undo of an effect that happened after the saga was compensated (see _late_reply)
        state = _with_step(state, definition.name, status=StepStatus.COMPENSATED)
        decision = _undo_late_effects(flow, replace(state, awaiting=None), limits, now) if awaited_here \
            else Decision(state=state)
        decision = replace(decision, note=f"the late effect of {definition.name} is undone")
    elif step.status in (StepStatus.COMPENSATED, StepStatus.SUCCEEDED) and step.marked_by_hand and not step.undone_twice:
        decision = Decision(state=state)  # nothing to apply (owed again by a late effect: still owed), but say so
    else:
        return None
    if step.marked_by_hand and not step.undone_twice:
        return _undone_twice(decision, definition, reply)
    return decision


def _undone_twice(decision: Decision, definition: StepDefinition, reply: Reply) -> Decision:
    """A participant undid a step that staff had marked compensated by hand: say so, once."""
    state = _with_step(decision.state, definition.name, undone_twice=True)
    event = Event(UNDONE_TWICE, {**_event_body(state), "step": definition.name, "command": reply.command})
    return Decision(state=state, messages=(*decision.messages, event),
                    note=f"undone twice: check with {participant_of(reply.command)}")


def _undo_late_effects(flow: Flow, state: SagaState, limits: Limits, now: float) -> Decision:
    """A compensated saga undoes, one at a time, the effects that happened after it was compensated."""
    owed = [step for step in reversed(state.steps) if step.status in OWED]
    if not owed:
        return Decision(state=replace(state, awaiting=None))
    state, command = _send_compensation(state, flow.step(owed[0].name), limits, now)
    return Decision(state=state, messages=(command,))


def _late_reply(flow: Flow, state: SagaState, reply: Reply, definition: StepDefinition, limits: Limits,
                now: float) -> Decision:
    step = state.step(definition.name)
    late_success = reply.command == definition.command and reply.status == ReplyStatus.SUCCESS
    if late_success and step.outcome_unknown and step.status == StepStatus.COMPENSATED:
        # The action happened after we gave up on it and undid it: it is owed again, with what its
        # success taught (an order_id, say) and a fresh budget of sends. A compensating saga undoes
        # it in its turn, a failed one when staff resume; a compensated one undoes it now, awaited
        # like any compensation, and stays compensated unless that undo gives up (then: failed).
        facts = {**state.facts, **{fact: reply.data[field] for field, fact in definition.learns if field in reply.data}}
        budget = step_limits(definition, limits).compensation_max_attempts
        state = _with_step(replace(state, facts=facts), step.name, status=StepStatus.SUCCEEDED, outcome_unknown=False,
                           compensation_limit=step.compensation_attempts + budget)
        note = "late success after compensation: it is undone again"
        if state.status == SagaStatus.COMPENSATED and state.awaiting is None:
            return replace(_undo_late_effects(flow, state, limits, now), note=note)
        return Decision(state=state, note=note)
    if state.status in TERMINAL:
        return ignored(state, f"reply for a {state.status} saga")
    return ignored(state, "reply not awaited (duplicate or stale attempt)")


def _forward_reply(flow: Flow, state: SagaState, reply: Reply, definition: StepDefinition, limits: Limits,
                   now: float) -> Decision:
    if reply.status == ReplyStatus.SUCCESS:
        facts = dict(state.facts)
        for data_field, fact in definition.learns:
            facts[fact] = reply.data[data_field]
        state = _with_step(replace(state, facts=facts, awaiting=None), definition.name, status=StepStatus.SUCCEEDED)
        return _advance(flow, state, limits, now)
    state = _with_step(state, definition.name, status=StepStatus.FAILED)
    state = replace(state, failure_reason=reply.reason or failed_reason(definition.name), awaiting=None)
    return _compensate_next(flow, state, limits, now)


def _compensation_failure(state: SagaState, reply: Reply, definition: StepDefinition) -> Decision:
    step = state.step(definition.name)
    if step.compensation_attempts >= step.compensation_limit:
        return _give_up_compensation(state, definition, reply.reason or "no reason given")
    answered = replace(state.awaiting, answered=True)
    return Decision(state=replace(state, awaiting=answered), note="compensation failed; sent again at its deadline")


def _give_up_compensation(state: SagaState, definition: StepDefinition, why: str) -> Decision:
    state = replace(state, failure_before_give_up=state.failure_reason,
                    failure_reason=f"{definition.compensation}{GAVE_UP}{why}")
    return _finish(state, SagaStatus.FAILED)


def _leave_failed(state: SagaState) -> SagaState:
    """A failed saga undoes again: the reason it was being undone comes back."""
    if state.status != SagaStatus.FAILED:
        return state
    return replace(state, status=SagaStatus.COMPENSATING, failure_reason=state.failure_before_give_up or state.failure_reason,
                   failure_before_give_up=None)


def on_timeout(flow: Flow, state: SagaState, *, limits: Limits, now: float) -> Decision:
    """Send the awaited command again, or give up on it, once its deadline has passed."""
    awaited = state.awaiting
    if awaited is None or now < awaited.deadline:
        return ignored(state, "no deadline passed")
    definition = flow.step(awaited.step)
    step = state.step(definition.name)
    if awaited.command == definition.command:
        if step.attempts < _forward_limit(definition, step, limits):
            state, command = _send_forward(state, definition, limits, now)
            return Decision(state=state, messages=(command,), note=f"no reply in time: {awaited.command} sent again")
        state = _with_step(state, definition.name, status=StepStatus.UNKNOWN, outcome_unknown=True)
        state = replace(state, awaiting=None, failure_reason=timed_out_reason(definition.name))
        return _compensate_next(flow, state, limits, now)
    if step.compensation_attempts < step.compensation_limit:
        state, command = _send_compensation(state, definition, limits, now)
        return Decision(state=state, messages=(command,), note=f"no success in time: {awaited.command} sent again")
    return _give_up_compensation(state, definition, f"no success after {step.compensation_attempts} attempts")


def _forward_limit(definition: StepDefinition, step: StepState, limits: Limits) -> int:
    return step_limits(definition, limits).step_max_attempts + step.granted_attempts


# Staff actions. `refusal` says, in a sentence, why the saga's state does not allow one (None: it
# does); each action raises ActionRefused with that sentence.

def refusal(state: SagaState, action: StaffAction, *, step_name: str | None = None) -> str | None:
    if action == StaffAction.COMPENSATE:
        if state.status == SagaStatus.COMPENSATING:
            return "This saga is already being compensated."
        if state.status == SagaStatus.COMPENSATED:
            return "Nothing is left to undo: every step of this saga is compensated."
        return None
    if action == StaffAction.RETRY:
        if state.awaiting is None:
            return f"This saga is {state.status}: no command is awaited, so there is nothing to retry."
        return None
    if action == StaffAction.RESUME:
        if state.status != SagaStatus.FAILED:
            return f"Only a failed saga can resume compensation; this one is {state.status}."
        return None
    if state.status not in (SagaStatus.FAILED, SagaStatus.COMPENSATING):
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


def compensate(flow: Flow, state: SagaState, *, reason: str, limits: Limits, now: float) -> Decision:
    _refuse_unless_allowed(state, StaffAction.COMPENSATE)
    if state.status == SagaStatus.FAILED:
        return resume_compensation(flow, state, limits=limits, now=now)
    if state.awaiting is not None:  # a command is in flight: it may still take effect
        state = _with_step(state, state.current_step, status=StepStatus.UNKNOWN, outcome_unknown=True)
    state = replace(state, awaiting=None, failure_reason=f"{STAFF_REASON_PREFIX}{reason}")
    return _compensate_next(flow, state, limits, now)


def retry_now(flow: Flow, state: SagaState, *, limits: Limits, now: float) -> Decision:
    """Send the awaited command again now; when its attempts are spent, staff grant one more.
    It never gives up on the step: that is the deadline's decision, or staff's `compensate`."""
    _refuse_unless_allowed(state, StaffAction.RETRY)
    awaited = state.awaiting
    definition = flow.step(awaited.step)
    step = state.step(definition.name)
    if awaited.command == definition.command:
        granted = step.attempts >= _forward_limit(definition, step, limits)
        if granted:
            state = _with_step(state, step.name, granted_attempts=step.granted_attempts + 1)
        state, command = _send_forward(state, definition, limits, now)
    else:
        granted = step.compensation_attempts >= step.compensation_limit
        if granted:
            state = _with_step(state, step.name, compensation_limit=step.compensation_limit + 1)
        state, command = _send_compensation(state, definition, limits, now)
    note = f"sent again by staff: {command.command}" + (" (one attempt more than the limit, granted by staff)" if granted else "")
    return Decision(state=state, messages=(command,), note=note)


def stuck_step(state: SagaState) -> StepState:
    """The step whose undo gave up (a step owed again by a late effect waits its turn after it)."""
    owed = [step for step in reversed(state.steps) if step.status in OWED]
    return next((step for step in owed if step.status == StepStatus.COMPENSATING), owed[0])


def resume_compensation(flow: Flow, state: SagaState, *, limits: Limits, now: float) -> Decision:
    _refuse_unless_allowed(state, StaffAction.RESUME)
    stuck = stuck_step(state)
    definition = flow.step(stuck.name)
    limit = stuck.compensation_attempts + step_limits(definition, limits).compensation_max_attempts
    state = _with_step(_leave_failed(state), stuck.name, compensation_limit=limit)
    state, command = _send_compensation(state, definition, limits, now)
    return Decision(state=state, messages=(command,))


def mark_compensated(flow: Flow, state: SagaState, *, step_name: str, limits: Limits, now: float) -> Decision:
    _refuse_unless_allowed(state, StaffAction.MARK_COMPENSATED, step_name=step_name)
    if state.current_step == step_name:
        state = replace(state, awaiting=None)
    state = _with_step(state, step_name, status=StepStatus.COMPENSATED, marked_by_hand=True)
    if state.awaiting is not None:
        return Decision(state=state)
    stuck = [step.name for step in state.steps if step.status == StepStatus.COMPENSATING]
    if state.status == SagaStatus.FAILED and stuck:
        # the undo that gave up is still owed: sending it again past its attempts is staff's call (resume)
        return Decision(state=state, note=f"{stuck[0]} is still owed and its undo gave up: resume it, or mark it too")
    return _compensate_next(flow, _leave_failed(state), limits, now)


def outstanding_compensations(flow: Flow, state: SagaState) -> list[OutstandingCompensation]:
    """Compensations sent with no success back: marking their step by hand risks undoing it twice."""
    outstanding = []
    for step in reversed(state.steps):
        if step.status != StepStatus.COMPENSATING or not step.compensation_attempts:
            continue
        command = flow.step(step.name).compensation
        awaited = state.awaiting if state.awaiting and state.awaiting.command == command else None
        outstanding.append(OutstandingCompensation(step.name, command, step.compensation_attempts,
                                                   awaited.sent_at if awaited else step.compensation_sent_at))
    return outstanding


def compensation_plan(flow: Flow, state: SagaState) -> list[Command]:
    """The compensations that `compensate` would send, in order, for a person to confirm."""
    planned = state.steps if state.status != SagaStatus.RUNNING else tuple(
        replace(step, status=StepStatus.UNKNOWN) if step.name == state.current_step else step for step in state.steps
    )
    return [
        _compensation_command(state, flow.step(step.name), step.compensation_attempts + 1)
        for step in reversed(planned)
        if step.status in OWED
    ]


def state_to_dict(state: SagaState) -> dict:
    """The state as JSON-ready data (what `state_from_dict` reads). Written out by hand: it runs
    twice per transition, and `dataclasses.asdict` (recursive, deep-copying) was a fifth of the
    consumer's CPU. `facts` is shared with the state, not copied: neither side changes it."""
    data = _fields_of(state)
    data["steps"] = [_fields_of(step) for step in state.steps]
    data["awaiting"] = _fields_of(state.awaiting) if state.awaiting else None
    return data


def _fields_of(instance) -> dict:
    return {name: getattr(instance, name) for name in instance.__dataclass_fields__}


def _known(cls, data: dict) -> dict:
    """The fields `cls` has: a state written by a newer version (a rolling deploy) still loads."""
    return {key: value for key, value in data.items() if key in cls.__dataclass_fields__}


def state_from_dict(data: dict) -> SagaState:
    """Also reads states stored by earlier versions: a field they lack takes its default."""
    flow, flow_version = data.get("flow", flows.ORDER_FLOW.name), data.get("flow_version", flows.ORDER_FLOW.version)
    awaiting = data.get("awaiting")
    if awaiting and "step" not in awaiting:  # stored before Awaiting named its step
        awaiting = {**awaiting, "step": flows.get(flow, flow_version).step_of(awaiting["command"]).name}
    return SagaState(
        saga_id=data["saga_id"],
        status=SagaStatus(data["status"]),
        facts=data["facts"],
        steps=tuple(StepState(**{**_known(StepState, step), "status": StepStatus(step["status"])}) for step in data["steps"]),
        awaiting=Awaiting(**_known(Awaiting, awaiting)) if awaiting else None,
        failure_reason=data.get("failure_reason"),
        version=data.get("version", 0),
        failure_before_give_up=data.get("failure_before_give_up"),
        flow=flow,
        flow_version=flow_version,
        started_at=data.get("started_at"),
    )
