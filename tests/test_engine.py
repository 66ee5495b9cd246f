"""The saga's pure rules: no broker, no database, no Redis."""
import re
from dataclasses import replace

import pytest
from hypothesis import event as count_path
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sagas import engine
from sagas.engine import ActionRefused, Command, Event, Limits, Reply
from sagas.flows import ORDER_FLOW, Flow, RetryPolicy, StepDefinition
from sagas.vocabulary import TERMINAL, UNDONE_TWICE, SagaStatus, StaffAction, StepStatus

LIMITS = Limits(step_timeout=10.0, step_max_attempts=3, compensation_max_attempts=4, backoff=2.0, max_wait=300.0)
FACTS = {"user_id": "alice", "items": [{"product_id": "sku-1", "quantity": 2}], "currency": "EUR", "payment_method": "pm-1"}
SUCCESS_DATA = {"stock.reduce": {"total": "19.98"}, "order.create": {"order_id": "o-1"}}


def started():
    return engine.start(ORDER_FLOW, saga_id="s-1", facts=FACTS, limits=LIMITS, now=0.0)


def succeed(decision, now=1.0):
    awaited = decision.state.awaiting
    reply = Reply(awaited.command, awaited.attempt, "success", data=SUCCESS_DATA.get(awaited.command, {}))
    return engine.on_reply(ORDER_FLOW, decision.state, reply, limits=LIMITS, now=now)


def fail(decision, reason="nope", now=1.0):
    awaited = decision.state.awaiting
    reply = Reply(awaited.command, awaited.attempt, "failure", reason)
    return engine.on_reply(ORDER_FLOW, decision.state, reply, limits=LIMITS, now=now)


def sent(decision):
    return [(m.command, m.attempt) for m in decision.messages if isinstance(m, Command)]


def test_happy_path_runs_the_steps_in_order_and_completes():
    decision = started()
    assert sent(decision) == [("stock.reduce", 1)]
    decision = succeed(decision)
    assert sent(decision) == [("payment.take", 1)]
    assert decision.messages[0].payload == {"user_id": "alice", "amount": "19.98", "currency": "EUR", "payment_method": "pm-1"}
    decision = succeed(decision)
    assert decision.messages[0].payload["amount"] == "19.98"
    decision = succeed(decision)
    assert decision.state.status == SagaStatus.COMPLETED
    (event,) = decision.messages
    assert event.routing_key == "saga.completed"
    assert event.body["order_id"] == "o-1" and event.body["total"] == "19.98"


def test_failure_at_the_last_step_undoes_the_earlier_ones_in_reverse():
    decision = succeed(succeed(started()))
    decision = fail(decision, "order_rejected")
    assert decision.state.status == SagaStatus.COMPENSATING
    assert sent(decision) == [("payment.refund", 1)]
    decision = succeed(decision)
    assert sent(decision) == [("stock.restore", 1)]
    decision = succeed(decision)
    assert decision.state.status == SagaStatus.COMPENSATED
    assert decision.messages[0].body["failure_reason"] == "order_rejected"


def test_failure_at_the_first_step_has_nothing_to_undo():
    decision = fail(started(), "out_of_stock")
    assert decision.state.status == SagaStatus.COMPENSATED
    assert [m.routing_key for m in decision.messages] == ["saga.compensated"]


def test_timeout_resends_then_gives_up_and_compensates_the_unknown_step_too():
    decision = succeed(started())
    for attempt in (2, 3):
        decision = engine.on_timeout(ORDER_FLOW, decision.state, limits=LIMITS, now=decision.state.awaiting.deadline)
        assert sent(decision) == [("payment.take", attempt)]
    decision = engine.on_timeout(ORDER_FLOW, decision.state, limits=LIMITS, now=decision.state.awaiting.deadline)
    assert decision.state.failure_reason == "take_payment_timed_out"
    assert sent(decision) == [("payment.refund", 1)]


def test_timeout_before_the_deadline_changes_nothing():
    decision = started()
    assert not engine.on_timeout(ORDER_FLOW, decision.state, limits=LIMITS, now=9.9).changed


def test_duplicate_and_stale_replies_change_nothing():
    decision = succeed(started())
    state = decision.state
    assert not engine.on_reply(ORDER_FLOW, state, Reply("stock.reduce", 1, "success", data={"total": "1"}),
            limits=LIMITS, now=2).changed
    assert not engine.on_reply(ORDER_FLOW, state, Reply("payment.take", 7, "success"), limits=LIMITS, now=2).changed
    assert not engine.on_reply(ORDER_FLOW, state, Reply("order.create", 1, "success", data={"order_id": "x"}),
            limits=LIMITS, now=2).changed


def test_compensation_failure_is_retried_at_its_deadline_then_the_saga_fails():
    decision = fail(succeed(started()))
    for attempt in range(2, LIMITS.compensation_max_attempts + 1):
        decision = fail(decision)
        assert decision.messages == ()
        decision = engine.on_timeout(ORDER_FLOW, decision.state, limits=LIMITS, now=decision.state.awaiting.deadline)
        assert sent(decision) == [("stock.restore", attempt)]
    decision = fail(decision, "warehouse_offline")
    assert decision.state.status == SagaStatus.FAILED
    assert "warehouse_offline" in decision.state.failure_reason


def test_late_success_after_the_step_was_compensated_sends_the_compensation_again():
    decision = started()
    for _ in range(LIMITS.step_max_attempts):
        decision = engine.on_timeout(ORDER_FLOW, decision.state, limits=LIMITS, now=decision.state.awaiting.deadline)
    decision = succeed(decision)  # stock.restore succeeded
    assert decision.state.status == SagaStatus.COMPENSATED
    late = engine.on_reply(ORDER_FLOW, decision.state, Reply("stock.reduce", 2, "success", data={"total": "5"}),
            limits=LIMITS, now=99)
    assert late.changed and late.state.status == SagaStatus.COMPENSATED
    assert sent(late) == [("stock.restore", 2)]
    again = engine.on_reply(ORDER_FLOW, late.state, Reply("stock.reduce", 3, "success", data={"total": "5"}),
            limits=LIMITS, now=100)
    assert not again.changed


def test_the_undo_of_a_late_effect_is_awaited_resent_and_gives_up_like_any_compensation():
    """Found in review: the undo sent after a late success went out once, with no deadline, so a
    lost or refused one left the effect standing under a compensated saga."""
    decision = started()
    for _ in range(LIMITS.step_max_attempts):
        decision = engine.on_timeout(ORDER_FLOW, decision.state, limits=LIMITS, now=decision.state.awaiting.deadline)
    decision = succeed(decision)
    late = engine.on_reply(ORDER_FLOW, decision.state, Reply("stock.reduce", 2, "success", data={"total": "5"}),
                           limits=LIMITS, now=99)
    assert (late.state.awaiting.command, late.state.awaiting.attempt) == ("stock.restore", 2)
    assert late.state.facts["amount"] == "5"  # what the late success taught goes into the undo
    resent = engine.on_timeout(ORDER_FLOW, late.state, limits=LIMITS, now=late.state.awaiting.deadline)
    assert sent(resent) == [("stock.restore", 3)] and resent.state.status == SagaStatus.COMPENSATED
    undone = engine.on_reply(ORDER_FLOW, resent.state, Reply("stock.restore", 2, "success"), limits=LIMITS, now=200)
    assert undone.state.awaiting is None and undone.messages == ()  # saga.compensated was told already
    assert undone.state.step("reduce_stock").status == StepStatus.COMPENSATED
    decision = resent
    while decision.state.status == SagaStatus.COMPENSATED:  # the participant never undoes it
        decision = engine.on_timeout(ORDER_FLOW, decision.state, limits=LIMITS, now=decision.state.awaiting.deadline)
    assert decision.state.status == SagaStatus.FAILED  # staff must act
    assert [m.routing_key for m in decision.messages if isinstance(m, Event)] == ["saga.failed"]


def test_staff_compensate_of_a_running_saga_undoes_the_step_in_flight():
    decision = succeed(started())
    plan = engine.compensation_plan(ORDER_FLOW, decision.state)
    assert [c.command for c in plan] == ["payment.refund", "stock.restore"]
    decision = engine.compensate(ORDER_FLOW, decision.state, reason="customer called", limits=LIMITS, now=2)
    assert sent(decision) == [("payment.refund", 1)]
    with pytest.raises(ActionRefused, match="already being compensated"):
        engine.compensate(ORDER_FLOW, decision.state, reason="again", limits=LIMITS, now=3)


def test_staff_compensate_of_a_completed_saga_undoes_every_step():
    decision = succeed(succeed(succeed(started())))
    decision = engine.compensate(ORDER_FLOW, decision.state, reason="refund", limits=LIMITS, now=5)
    assert sent(decision) == [("order.cancel", 1)]
    assert decision.messages[0].payload["order_id"] == "o-1"


def test_failed_saga_resumes_or_is_marked_compensated_by_hand():
    decision = fail(succeed(succeed(started())))
    decision = replace(decision, state=replace(decision.state, status=SagaStatus.FAILED, awaiting=None))
    resumed = engine.resume_compensation(ORDER_FLOW, decision.state, limits=LIMITS, now=10)
    assert sent(resumed) == [("payment.refund", 2)]
    marked = engine.mark_compensated(ORDER_FLOW, decision.state, step_name="take_payment", limits=LIMITS, now=10)
    assert sent(marked) == [("stock.restore", 1)]
    with pytest.raises(ActionRefused, match="nothing of it is owed"):
        engine.mark_compensated(ORDER_FLOW, decision.state, step_name="create_order", limits=LIMITS, now=10)


def test_retry_now_is_refused_when_nothing_is_awaited():
    decision = fail(started())
    with pytest.raises(ActionRefused, match="nothing to retry"):
        engine.retry_now(ORDER_FLOW, decision.state, limits=LIMITS, now=1)


def test_state_survives_a_round_trip_through_json():
    state = succeed(started()).state
    assert engine.state_from_dict(engine.state_to_dict(state)) == state


def deadlines(decision, limits=LIMITS, sends=6, flow=ORDER_FLOW):
    """The wait after each send of the awaited command, while only deadlines pass."""
    waits = []
    for _ in range(sends):
        awaited = decision.state.awaiting
        if awaited is None:
            break
        waits.append(awaited.deadline - awaited.sent_at)
        decision = engine.on_timeout(flow, decision.state, limits=limits, now=awaited.deadline)
    return waits, decision


def test_each_resend_waits_backoff_times_longer_up_to_the_cap():
    limits = Limits(step_timeout=10.0, step_max_attempts=4, compensation_max_attempts=6, backoff=2.0, max_wait=35.0)
    waits, _ = deadlines(engine.start(ORDER_FLOW, saga_id="s-1", facts=FACTS, limits=limits, now=0.0), limits)
    assert waits[:4] == [10.0, 20.0, 35.0, 35.0]  # stock.reduce, sends 1-4
    assert waits[4:] == [10.0, 20.0]  # then stock.restore starts again from the step timeout


def test_fractional_backoff_and_an_absurd_attempt_number_stay_capped():
    limits = Limits(step_timeout=0.5, step_max_attempts=3, compensation_max_attempts=3, backoff=1.5, max_wait=2.0)
    assert [engine.wait_after_send(limits, n) for n in (1, 2, 3, 4)] == [0.5, 0.75, 1.125, 1.6875]
    assert engine.wait_after_send(limits, 10**6) == 2.0


def test_a_participant_slow_for_minutes_does_not_use_up_the_attempts_in_seconds():
    defaults = Limits(step_timeout=30.0, step_max_attempts=3, compensation_max_attempts=10, backoff=2.0, max_wait=300.0)
    waits, decision = deadlines(engine.start(ORDER_FLOW, saga_id="s-1", facts=FACTS, limits=defaults, now=0.0), defaults, sends=3)
    assert sum(waits) == 210.0  # 30 + 60 + 120 s of waiting for the stock service before giving up
    assert decision.state.step("reduce_stock").status == StepStatus.COMPENSATING
    waits, decision = deadlines(decision, defaults, sends=10)
    assert sum(waits) >= 30 * 60 and decision.state.status == SagaStatus.FAILED


def test_a_step_of_the_flow_may_declare_its_own_retry_policy():
    patient = replace(ORDER_FLOW.steps[0], retry=RetryPolicy(timeout=60.0, backoff=1.0, attempts=2, compensation_attempts=1))
    flow = Flow("order", 99, (patient, *ORDER_FLOW.steps[1:]))
    start = engine.start(flow, saga_id="s-1", facts=FACTS, limits=LIMITS, now=0.0)
    waits, decision = deadlines(start, sends=3, flow=flow)
    assert waits == [60.0, 60.0, 60.0]  # two stock.reduce sends, then one stock.restore
    assert decision.state.status == SagaStatus.FAILED
    reply = Reply("stock.reduce", 1, "success", data={"total": "1.00"})
    assert engine.on_reply(flow, start.state, reply, limits=LIMITS, now=1.0).state.awaiting.deadline == 1.0 + 10.0
    # the order flow itself keeps the settings
    assert started().state.awaiting.deadline == LIMITS.step_timeout


SHIPPING = StepDefinition(name="ship", command="shipping.dispatch", compensation="shipping.recall",
                          payload=("order_id", "items"), compensation_payload=("order_id", "shipment_id?"),
                          learns=(("shipment_id", "shipment_id"),))
FOUR_STEPS = Flow("order-shipped", 1, (*ORDER_FLOW.steps, SHIPPING))
FOUR_STEP_DATA = {**SUCCESS_DATA, "shipping.dispatch": {"shipment_id": "sh-7"}}


def run_through(flow, decision, *, fail_at=None):
    """Answer every awaited command with success (failure for `fail_at`) until nothing is awaited."""
    while decision.state.awaiting is not None:
        awaited = decision.state.awaiting
        status = "failure" if awaited.command == fail_at else "success"
        reply = Reply(awaited.command, awaited.attempt, status, reason="no" if status == "failure" else None,
                      data=FOUR_STEP_DATA.get(awaited.command, {}) if status == "success" else {})
        decision = engine.on_reply(flow, decision.state, reply, limits=LIMITS, now=1.0)
    return decision


def test_a_four_step_flow_runs_through_the_engine_and_learns_what_its_steps_teach():
    start = engine.start(FOUR_STEPS, saga_id="s-4", facts=FACTS, limits=LIMITS, now=0.0)
    assert (start.state.flow, start.state.flow_version) == ("order-shipped", 1)
    done = run_through(FOUR_STEPS, start)
    assert done.state.status == SagaStatus.COMPLETED
    assert [s.status for s in done.state.steps] == [StepStatus.SUCCEEDED] * 4
    assert done.state.facts["shipment_id"] == "sh-7"
    assert [m.routing_key for m in done.messages] == ["saga.completed"]


def test_a_four_step_flow_undoes_its_steps_in_reverse_when_the_last_one_fails():
    undone = run_through(FOUR_STEPS, engine.start(FOUR_STEPS, saga_id="s-4", facts=FACTS, limits=LIMITS, now=0.0),
                         fail_at="shipping.dispatch")
    assert undone.state.status == SagaStatus.COMPENSATED
    assert [s.status for s in undone.state.steps] == [StepStatus.COMPENSATED] * 3 + [StepStatus.FAILED]


def test_a_reply_for_a_command_not_in_the_sagas_flow_changes_nothing_and_says_so():
    decision = engine.on_reply(ORDER_FLOW, started().state, Reply("shipping.dispatch", 1, "success"), limits=LIMITS, now=1)
    assert not decision.changed and decision.note == "shipping.dispatch is not a command of flow order v1"


def gave_up_undoing():
    """Payment declined; stock.restore went unanswered for all its sends: the saga is failed."""
    decision = fail(succeed(started()), "payment_declined")
    _, decision = deadlines(decision, sends=LIMITS.compensation_max_attempts)
    assert decision.state.status == SagaStatus.FAILED
    return decision


def test_a_late_compensation_success_heals_a_failed_saga():
    decision = gave_up_undoing()
    assert decision.state.failure_reason == "stock.restore did not succeed: no success after 4 attempts"
    healed = engine.on_reply(ORDER_FLOW, decision.state, Reply("stock.restore", 2, "success"), limits=LIMITS, now=500)
    assert healed.state.status == SagaStatus.COMPENSATED
    assert healed.state.failure_reason == "payment_declined"  # why it was undone, again
    assert [m.routing_key for m in healed.messages] == ["saga.compensated"]
    assert "after the saga failed" in healed.note
    assert not engine.on_reply(ORDER_FLOW, healed.state, Reply("stock.restore", 3, "success"), limits=LIMITS, now=501).changed


def test_a_late_compensation_success_on_a_failed_saga_carries_on_with_the_next_undo():
    decision = fail(succeed(succeed(started())), "order_rejected")
    _, decision = deadlines(decision, sends=LIMITS.compensation_max_attempts)
    assert decision.state.status == SagaStatus.FAILED
    healed = engine.on_reply(ORDER_FLOW, decision.state, Reply("payment.refund", 1, "success"), limits=LIMITS, now=500)
    assert healed.state.status == SagaStatus.COMPENSATING and sent(healed) == [("stock.restore", 1)]
    assert succeed(healed).state.status == SagaStatus.COMPENSATED


def test_a_success_to_an_earlier_send_of_the_awaited_compensation_counts():
    decision = fail(succeed(started()))
    _, decision = deadlines(decision, sends=2)
    assert (decision.state.awaiting.command, decision.state.awaiting.attempt) == ("stock.restore", 3)
    counted = engine.on_reply(ORDER_FLOW, decision.state, Reply("stock.restore", 1, "success"), limits=LIMITS, now=99)
    assert counted.state.status == SagaStatus.COMPENSATED and "earlier send" in counted.note


def test_a_failure_to_an_earlier_send_changes_nothing():
    decision = fail(succeed(started()))
    _, decision = deadlines(decision, sends=1)
    assert not engine.on_reply(ORDER_FLOW, decision.state, Reply("stock.restore", 1, "failure", "x"),
            limits=LIMITS, now=99).changed


def test_a_participant_undoing_a_step_marked_by_hand_is_flagged_undone_twice():
    decision = gave_up_undoing()
    (outstanding,) = engine.outstanding_compensations(ORDER_FLOW, decision.state)
    assert (outstanding.step, outstanding.command, outstanding.sends) == ("reduce_stock", "stock.restore", 4)
    assert outstanding.last_sent_at == decision.state.step("reduce_stock").compensation_sent_at > 1
    marked = engine.mark_compensated(ORDER_FLOW, decision.state, step_name="reduce_stock", limits=LIMITS, now=600)
    assert marked.state.status == SagaStatus.COMPENSATED and marked.state.step("reduce_stock").marked_by_hand
    assert engine.outstanding_compensations(ORDER_FLOW, marked.state) == []
    twice = engine.on_reply(ORDER_FLOW, marked.state, Reply("stock.restore", 3, "success"), limits=LIMITS, now=700)
    assert twice.note == "undone twice: check with stock"
    (event,) = twice.messages
    assert event.routing_key == "saga.undone_twice"
    assert event.body == {**engine.terminal_event(marked.state).body, "step": "reduce_stock", "command": "stock.restore"}
    assert twice.state.status == SagaStatus.COMPENSATED
    assert not engine.on_reply(ORDER_FLOW, twice.state, Reply("stock.restore", 4, "success"), limits=LIMITS, now=701).changed


def test_a_step_marked_by_hand_before_any_undo_was_sent_is_not_flagged():
    decision = fail(succeed(succeed(started())))  # payment.refund 1 in flight, stock.restore never sent
    marked = engine.mark_compensated(ORDER_FLOW, decision.state, step_name="reduce_stock", limits=LIMITS, now=5)
    assert not engine.on_reply(ORDER_FLOW, marked.state, Reply("stock.restore", 1, "success"), limits=LIMITS, now=6).changed


def test_retry_now_with_the_attempts_spent_grants_one_more_and_never_gives_up():
    decision = succeed(started())
    _, decision = deadlines(decision, sends=LIMITS.step_max_attempts - 1)
    assert decision.state.awaiting.attempt == LIMITS.step_max_attempts
    retried = engine.retry_now(ORDER_FLOW, decision.state, limits=LIMITS, now=decision.state.awaiting.deadline + 1)
    assert sent(retried) == [("payment.take", 4)] and retried.state.status == SagaStatus.RUNNING
    assert "granted by staff" in retried.note and retried.state.step("take_payment").granted_attempts == 1
    gave_up = engine.on_timeout(ORDER_FLOW, retried.state, limits=LIMITS, now=retried.state.awaiting.deadline)
    assert sent(gave_up) == [("payment.refund", 1)]  # the deadline may still give up, after the granted send


def test_retry_now_with_attempts_left_is_a_plain_resend():
    retried = engine.retry_now(ORDER_FLOW, started().state, limits=LIMITS, now=3)
    assert sent(retried) == [("stock.reduce", 2)] and retried.state.step("reduce_stock").granted_attempts == 0
    assert retried.state.awaiting.deadline == 3 + LIMITS.step_timeout * LIMITS.backoff


def test_retry_now_of_a_compensation_whose_attempts_are_spent_grants_one_more():
    decision = fail(succeed(started()))
    _, decision = deadlines(decision, sends=LIMITS.compensation_max_attempts - 1)
    decision = fail(decision, "warehouse_closed")
    assert decision.state.status == SagaStatus.FAILED
    assert engine.refusal(decision.state, StaffAction.RETRY) is not None  # failed: resume instead
    decision = fail(succeed(started()))
    _, decision = deadlines(decision, sends=LIMITS.compensation_max_attempts - 1)
    retried = engine.retry_now(ORDER_FLOW, decision.state, limits=LIMITS, now=1000)
    assert sent(retried) == [("stock.restore", LIMITS.compensation_max_attempts + 1)]
    assert retried.state.status == SagaStatus.COMPENSATING


def test_the_engine_states_which_staff_actions_a_state_allows():
    allowed = {action for action, why in engine.refusals(started().state).items() if why is None}
    assert allowed == {StaffAction.COMPENSATE, StaffAction.RETRY}
    failed = engine.refusals(gave_up_undoing().state)
    assert failed[StaffAction.RETRY] == "This saga is failed: no command is awaited, so there is nothing to retry."
    assert failed[StaffAction.RESUME] is None and failed[StaffAction.MARK_COMPENSATED] is None
    completed = engine.refusals(succeed(succeed(succeed(started()))).state)
    assert completed[StaffAction.COMPENSATE] is None
    assert "only while a saga is compensating or failed" in completed[StaffAction.MARK_COMPENSATED]
    assert engine.refusal(gave_up_undoing().state, StaffAction.MARK_COMPENSATED,
                          step_name="take_payment") == "Step take_payment is failed: nothing of it is owed."


def test_a_state_stored_before_these_fields_existed_still_loads():
    state = fail(succeed(started())).state
    stored = engine.state_to_dict(state)
    for new_field in ("failure_before_give_up", "flow", "flow_version"):
        del stored[new_field]
    del stored["awaiting"]["step"]
    for step in stored["steps"]:
        for new_field in ("granted_attempts", "compensation_sent_at", "marked_by_hand", "undone_twice"):
            del step[new_field]
    loaded = engine.state_from_dict(stored)
    assert loaded == replace(state, steps=tuple(replace(s, compensation_sent_at=None) for s in state.steps))
    assert [m.routing_key for m in engine.on_reply(ORDER_FLOW, loaded, Reply("stock.restore", 1, "success"), limits=LIMITS,
                                                   now=2).messages] == ["saga.compensated"]


# The stateful property: any history of sends, participants acting on any send (earlier ones too,
# more than once), replies delivered late, twice or never, deadlines passing at any moment, and
# the four staff actions. The test keeps its own model of what each participant did and judges
# the engine against it, not against the engine's own view.

MACHINE_LIMITS = Limits(step_timeout=10.0, step_max_attempts=3, compensation_max_attempts=3, backoff=2.0, max_wait=45.0)
FORWARD = {step.command: step.name for step in ORDER_FLOW.steps}
UNDO = {step.compensation: step.name for step in ORDER_FLOW.steps}
STEP_NAMES = [step.name for step in ORDER_FLOW.steps]


def expected_wait(attempt: int) -> float:
    return min(MACHINE_LIMITS.step_timeout * MACHINE_LIMITS.backoff ** (attempt - 1), MACHINE_LIMITS.max_wait)


class SagaHistory(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.now = 0.0
        self.sent: list[tuple[Command, float]] = []
        self.replies: list[Reply] = []  # replies the participants produced; any may be delivered, any number of times
        self.terminal_events: list[str] = []
        self.flagged: set[str] = set()  # steps the engine reported undone twice
        # the participants, per step: its forward outcome once decided; whether its effect stands (and
        # since which send); whether it carried out the undo (then a late forward is refused, as the
        # demo participants' tombstones do)
        self.outcome: dict[str, str] = {}
        self.effect_since: dict[str, int] = {}
        self.undone_by_participant: set[str] = set()
        # staff
        self.marked_at: dict[str, int] = {}
        self.undo_reported_after_mark: set[str] = set()
        self.limit = {**{c: MACHINE_LIMITS.step_max_attempts for c in FORWARD},
                      **{c: MACHINE_LIMITS.compensation_max_attempts for c in UNDO}}
        self.success_known_at: dict[str, int] = {}  # when a forward success first reached the engine
        self.forward_failure_known: set[str] = set()  # a failure of the awaited forward send reached the engine
        self.state = None
        self.take(engine.start(ORDER_FLOW, saga_id="s-1", facts=FACTS, limits=MACHINE_LIMITS, now=0.0), "start")

    # bookkeeping and per-decision checks

    def sends_of(self, command: str) -> int:
        return sum(1 for sent, _ in self.sent if sent.command == command)

    def take(self, decision, origin: str, reply: Reply | None = None):
        before = self.state.status if self.state else None
        commands = [m for m in decision.messages if isinstance(m, Command)]
        events = [m for m in decision.messages if isinstance(m, Event)]
        if before in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED) and origin not in ("staff compensate",):
            # a finished saga only sends the documented late handling: the undo of an effect that
            # happened after it was compensated, and that undo's resends until it succeeds or gives up
            late_undo = reply is not None and reply.command in FORWARD and reply.status == "success"
            undoing_late = self.state.awaiting is not None and self.state.awaiting.command in UNDO
            assert all((late_undo or undoing_late) and c.command in UNDO for c in commands), (origin, commands)
            gave_up = undoing_late and decision.state.status == SagaStatus.FAILED
            assert all(e.routing_key == UNDONE_TWICE or (gave_up and e.routing_key == "saga.failed") for e in events), \
                (origin, events)
        if before == SagaStatus.FAILED and origin in ("deadline",):
            assert decision.messages == ()
        for command in commands:
            assert command.attempt == self.sends_of(command.command) + 1  # sends are numbered without gaps
            if command.command in UNDO:
                step = UNDO[command.command]
                # only a step that may have an effect is undone: its forward was sent, not known to have failed
                assert self.sends_of(ORDER_FLOW.steps[STEP_NAMES.index(step)].command) > 0
                assert step not in self.forward_failure_known
            else:
                assert not any(sent.command in UNDO for sent, _ in self.sent), "forward after undoing began"
            self.sent.append((command, self.now))
            assert command.attempt <= self.limit[command.command], (command, self.limit)
        for event in events:
            if event.routing_key == UNDONE_TWICE:
                assert event.body["step"] not in self.flagged  # once
                self.flagged.add(event.body["step"])
                assert event.body["command"] == ORDER_FLOW.steps[STEP_NAMES.index(event.body["step"])].compensation
            else:
                assert event.routing_key == f"saga.{decision.state.status}"
                # after saga.compensated only saga.failed may follow: a late effect whose undo gave up
                allowed = ("saga.failed", "saga.completed")
                if event.routing_key == "saga.failed":
                    allowed += ("saga.compensated",)
                assert not self.terminal_events or self.terminal_events[-1] in allowed
                self.terminal_events.append(event.routing_key)
        for kind in ("after the saga failed", "earlier send", "undone twice", "granted by staff", "late success after"):
            if kind in decision.note:
                count_path(kind)  # shown by --hypothesis-show-statistics: the histories reach these paths
        self.state = decision.state

    # participants, replies and time

    @rule(pick=st.integers(min_value=0), refuses=st.booleans(), deliver=st.booleans())
    def participant_acts(self, pick, refuses, deliver):
        command, _ = self.sent[pick % len(self.sent)]
        if command.command in FORWARD:
            step = FORWARD[command.command]
            if step not in self.outcome:  # a repeated request gets the first outcome
                self.outcome[step] = "failure" if refuses or step in self.undone_by_participant else "success"
                if self.outcome[step] == "success":
                    self.effect_since[step] = len(self.sent)
            reply = Reply(command.command, command.attempt, self.outcome[step], None if self.outcome[step] == "success" else "no",
                          SUCCESS_DATA.get(command.command, {}))
        else:
            step = UNDO[command.command]
            if refuses and step not in self.undone_by_participant:
                reply = Reply(command.command, command.attempt, "failure", "busy")
            else:
                self.undone_by_participant.add(step)
                self.effect_since.pop(step, None)
                reply = Reply(command.command, command.attempt, "success")
        self.replies.append(reply)
        if deliver:
            self.deliver(reply)

    @precondition(lambda self: self.replies)
    @rule(pick=st.integers(min_value=0))
    def reply_arrives(self, pick):  # late, out of order, or again
        self.deliver(self.replies[pick % len(self.replies)])

    def deliver(self, reply: Reply):
        awaited = self.state.awaiting
        if reply.command in UNDO and reply.status == "success" and UNDO[reply.command] in self.marked_at:
            self.undo_reported_after_mark.add(UNDO[reply.command])
        if reply.command in FORWARD and reply.status == "failure" and awaited \
                and (awaited.command, awaited.attempt) == (reply.command, reply.attempt):
            self.forward_failure_known.add(FORWARD[reply.command])
        if reply.command in FORWARD and reply.status == "success":
            self.success_known_at.setdefault(FORWARD[reply.command], len(self.sent))
            step = self.state.step(FORWARD[reply.command])
            if step.status == StepStatus.COMPENSATED and step.outcome_unknown:  # a late effect: owed again,
                undo = ORDER_FLOW.steps[STEP_NAMES.index(step.name)].compensation  # with a fresh budget
                self.limit[undo] = self.sends_of(undo) + MACHINE_LIMITS.compensation_max_attempts
        self.take(engine.on_reply(ORDER_FLOW, self.state, reply, limits=MACHINE_LIMITS, now=self.now), "reply", reply)

    @rule(seconds=st.floats(min_value=0, max_value=120, allow_nan=False))
    def time_passes(self, seconds):
        self.now += seconds
        self.take(engine.on_timeout(ORDER_FLOW, self.state, limits=MACHINE_LIMITS, now=self.now), "deadline")

    @precondition(lambda self: self.state.awaiting is not None)
    @rule()
    def the_deadline_passes(self):
        self.now = max(self.now, self.state.awaiting.deadline)
        self.take(engine.on_timeout(ORDER_FLOW, self.state, limits=MACHINE_LIMITS, now=self.now), "deadline")

    # staff

    def staff(self, action, act, origin, **details):
        refused = engine.refusal(self.state, action, **details)
        if refused:
            with pytest.raises(ActionRefused, match=re.escape(refused)):
                act()
            return None
        decision = act()
        self.take(decision, origin)
        return decision

    def grant_resume(self):
        if self.state.status == SagaStatus.FAILED:  # resuming grants a fresh set of sends to the stuck undo
            stuck = engine.stuck_step(self.state)
            command = ORDER_FLOW.steps[STEP_NAMES.index(stuck.name)].compensation
            self.limit[command] = self.sends_of(command) + MACHINE_LIMITS.compensation_max_attempts

    @rule()
    def staff_compensate(self):
        if engine.refusal(self.state, StaffAction.COMPENSATE) is None:
            self.grant_resume()
        self.staff(StaffAction.COMPENSATE, lambda: engine.compensate(ORDER_FLOW,
            self.state, reason="customer called", limits=MACHINE_LIMITS, now=self.now), "staff compensate")

    @rule()
    def staff_retry_now(self):
        awaited = self.state.awaiting
        if awaited is not None and self.sends_of(awaited.command) >= self.limit[awaited.command]:
            self.limit[awaited.command] += 1  # staff grant one more send
        decision = self.staff(StaffAction.RETRY, lambda: engine.retry_now(ORDER_FLOW,
            self.state, limits=MACHINE_LIMITS, now=self.now), "staff retry")
        if decision is not None:  # it resends the awaited command and never gives up
            assert [(m.command, m.attempt) for m in decision.messages] == [(awaited.command, self.sends_of(awaited.command))]
            assert decision.state.status == self.state.status

    @rule()
    def staff_resume(self):
        if engine.refusal(self.state, StaffAction.RESUME) is None:
            self.grant_resume()
        self.staff(StaffAction.RESUME, lambda: engine.resume_compensation(ORDER_FLOW,
            self.state, limits=MACHINE_LIMITS, now=self.now), "staff resume")

    @rule(step=st.sampled_from(STEP_NAMES))
    def staff_mark_compensated(self, step):
        if engine.refusal(self.state, StaffAction.MARK_COMPENSATED, step_name=step) is None:
            self.marked_at[step] = len(self.sent)
        self.staff(StaffAction.MARK_COMPENSATED, lambda: engine.mark_compensated(ORDER_FLOW,
            self.state, step_name=step, limits=MACHINE_LIMITS, now=self.now), "staff mark", step_name=step)

    # what must hold after every step of every history

    @invariant()
    def every_deadline_follows_the_backoff_formula(self):
        awaited = self.state.awaiting
        if awaited is not None:
            last, sent_at = next((c, t) for c, t in reversed(self.sent) if c.command == awaited.command)
            assert (awaited.attempt, awaited.sent_at) == (last.attempt, sent_at)
            assert awaited.deadline == sent_at + expected_wait(awaited.attempt)

    @invariant()
    def a_completed_saga_did_everything_and_undid_nothing(self):
        if self.state.status == SagaStatus.COMPLETED:
            assert set(self.effect_since) == set(STEP_NAMES)
            assert not self.undone_by_participant and not self.marked_at
            assert not any(c.command in UNDO for c, _ in self.sent)

    @invariant()
    def a_compensated_saga_left_no_effect_standing(self):
        if self.state.status == SagaStatus.COMPENSATED:
            for step in self.effect_since:
                # an effect the engine heard of is undone after it heard (or marked by hand after); one
                # it never heard of was undone in case (the participant meets that undo after the forward)
                undo = ORDER_FLOW.steps[STEP_NAMES.index(step)].compensation
                since = self.success_known_at.get(step, 0)
                marked_after = self.marked_at.get(step, -1) >= since
                undo_on_its_way = any(c.command == undo for c, _ in self.sent[since:])
                assert marked_after or undo_on_its_way, (step, self.success_known_at, self.marked_at)

    @invariant()
    def an_undo_after_a_hand_mark_is_flagged_and_nothing_else_is(self):
        assert self.flagged == self.undo_reported_after_mark

    def teardown(self):
        # from here on only deadlines pass: every saga ends, within its (granted) sends
        for _ in range(200):
            if self.state.awaiting is None:
                break
            self.the_deadline_passes()
        assert self.state.awaiting is None
        assert self.state.status in TERMINAL or self.state.status == SagaStatus.COMPENSATING


SagaHistory.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestAnyHistoryOfRepliesDeadlinesAndStaffActions = SagaHistory.TestCase
