"""The fault checker can fail: each planted violation fails the check, and a clean run passes.

No fault is injected here (nothing is restarted). Sagas run through the real service functions
on the test database and Redis, their commands go through the real broker (the tests' vhost) to
the demo participants' `handle_command` on a real ledger file, and their replies come back
through `apply_replies`: the same rows and ledger a fault run leaves behind. A violation is then
planted where a bug would leave it (a ledger row, a timeline row, a lost reply, a refusing
participant) and `check` must say so in the row that names it.
"""
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from demo.participants import Ledger, handle_command, read_evidence, refuse_compensations, reply_plan
from lab.faults import infra
from lab.faults.checker import EVENTS_QUEUE, FaultWindow, check, doubled_effects, read_sagas
from lab.faults.orders import Order, order_body
from lab.faults.schedule import (
    FLUSH_REDIS,
    KILL_CONSUMER,
    PARTICIPANTS,
    REFUSE_COMPENSATIONS,
    RESTART_RABBITMQ,
    plan_faults,
)
from sagas import runtime, services
from sagas.broker import EVENTS_EXCHANGE, PARTICIPANT_QUEUES
from sagas.engine import TERMINAL, Reply
from sagas.models import Saga, TimelineEntry
from tests.conftest import database_url

UNORDERABLE = {"items": [{"product_id": "sku-unorderable", "quantity": 1}], "currency": "EUR", "payment_method": "pm-1"}


@dataclass
class Run:
    """A fault run in miniature: orders in, commands over the broker, the participants' ledger."""

    vhost: str
    ledger_path: str
    orders: list[Order] = field(default_factory=list)
    events: list[infra.RawMessage] = field(default_factory=list)

    def order(self, kind: str, body: dict | None = None) -> str:
        number = len(self.orders)
        order = Order(number=number, kind=kind, key=f"checker-{number}",
                      body=body or order_body(kind, random.Random(number)))
        saga, _ = services.start_order_saga(user_id="alice", items=order.body["items"], currency="EUR",
                                            payment_method=order.body["payment_method"], idempotency_key=order.key)
        order.saga_id, order.status_code, order.accepted_at = str(saga.pk), 202, time.time()
        self.orders.append(order)
        return order.saga_id

    def finish(self, *, lose_reply=lambda body: False, within: float = 15.0) -> None:
        """Deliver every command and every reply (copies included, as sku-dup sends them), and
        act on due deadlines, until every saga is terminal. `lose_reply` drops replies in transit."""
        end = time.monotonic() + within
        ledger = Ledger(self.ledger_path)
        try:
            while time.monotonic() < end:
                delivered = self._deliver(ledger, lose_reply)
                if Saga.objects.exclude(status__in=TERMINAL).count() == 0:
                    runtime.current().sent_marker.flush()
                    return
                if not delivered:
                    time.sleep(0.02)
                    services.handle_due_timeouts()
        finally:
            ledger.close()
        raise AssertionError(f"sagas not terminal after {within}s")

    def _deliver(self, ledger: Ledger, lose_reply) -> int:
        delivered = 0
        for queue in PARTICIPANT_QUEUES:
            for message in infra.take_all(self.vhost, queue):
                body = json.loads(message.body)
                reply = handle_command(ledger, body)
                delivered += 1
                if reply is None or lose_reply(body):
                    continue
                for _ in range(reply_plan(body).copies):
                    services.apply_replies([services.IncomingReply(reply["saga_id"], Reply(
                        reply["command"], reply["attempt"], reply["status"], reply["reason"], reply["data"]))])
        return delivered

    def check(self, *faults: FaultWindow):
        """The checker's report on the run so far, as if the schedule had done `faults`."""
        from django.conf import settings

        # the checker takes the events it reads: put them back for the next look
        self.events += infra.take_all(self.vhost, EVENTS_QUEUE)
        infra.publish_raw(self.vhost, [(EVENTS_QUEUE, event) for event in self.events])
        url = database_url()
        return check(orders=self.orders, sagas=read_sagas(url), database_url=url, redis_db=settings.REDIS_DB,
                     ledger_path=self.ledger_path, vhost=self.vhost, poison_ids=[], died_on_their_own=[],
                     faults=list(faults))


@pytest.fixture
def run(transactional_db, fresh_redis, fresh_queues, settings, tmp_path):
    settings.SAGA_STEP_TIMEOUT_SECONDS = 0.1
    settings.SAGA_STEP_MAX_ATTEMPTS = 3
    settings.SAGA_COMPENSATION_MAX_ATTEMPTS = 2
    vhost = settings.RABBITMQ["vhost"]
    infra.declare_queue(vhost, EVENTS_QUEUE, bind_to=(EVENTS_EXCHANGE, "saga.*"))
    try:
        yield Run(vhost, str(tmp_path / "ledger.sqlite3"))
    finally:
        infra.delete_queue(vhost, EVENTS_QUEUE)


def failing(report) -> set[str]:
    return {row.name for row in report.failures}


def around(saga_id: str, kind: str, target: str | None = None, *, offset: float = 0.0) -> FaultWindow:
    """A fault of `kind` during the saga's life, moved by `offset` seconds."""
    saga = Saga.objects.get(pk=saga_id)
    start, end = saga.created_at.timestamp(), saga.updated_at.timestamp()
    return FaultWindow(kind, target, start + offset, end + offset)


def book(ledger_path: str, saga_id: str, participant: str, effect: str, **columns) -> None:
    """A ledger row as a participant writes it: what a participant bug would leave behind."""
    ledger = Ledger(ledger_path)
    try:
        with ledger.transaction() as db:
            db.execute("INSERT INTO ledger (at, saga_id, participant, effect, product_id, quantity, amount, currency)"
                       " VALUES (datetime('now'), ?, ?, ?, ?, ?, ?, ?)",
                       (saga_id, participant, effect, columns.get("product_id"), columns.get("quantity"),
                        columns.get("amount"), columns.get("currency")))
    finally:
        ledger.close()


def test_a_clean_run_of_every_order_kind_passes(run):
    for kind in ("normal", "sold_out", "declined", "silent_once", "dup"):
        run.order(kind)
    run.finish()
    report = run.check()
    assert report.ok, report.table() + "\n" + "\n".join(report.details)
    assert report.row("  completed").value == 3 and report.row("  compensated").value == 2
    # silent_once was sent twice: the receipts count both sends
    assert report.row("commands received (participants)").value == report.row("commands sent (timeline)").value > 10


@pytest.mark.parametrize("participant, taken, undone, columns", [
    ("payment", "charged", "refunded", {"amount": "4.00", "currency": "EUR"}),
    ("stock", "stock_reduced", "stock_restored", {"product_id": "sku-unorderable", "quantity": 1}),
], ids=["payment-taken-twice", "stock-reduced-twice"])
def test_an_effect_applied_twice_fails_even_when_the_net_is_right(run, participant, taken, undone, columns):
    saga_id = run.order("unorderable", UNORDERABLE)  # stock and payment taken, then undone
    run.finish()
    assert run.check().ok
    book(run.ledger_path, saga_id, participant, taken, **columns)
    book(run.ledger_path, saga_id, participant, undone, **columns)
    report = run.check()
    assert report.row("DUPLICATED/MISSING effects: ledger != status").value == 0  # the net hides it
    assert failing(report) == {"effects applied twice (e.g. a payment taken twice)"}


def test_a_doubled_charge_of_a_completed_saga_fails(run):
    saga_id = run.order("normal")
    run.finish()
    [charge] = [e for e in read_evidence(run.ledger_path).effects if e["effect"] == "charged"]
    book(run.ledger_path, saga_id, "payment", "charged", amount=charge["amount"], currency="EUR")
    assert failing(run.check()) == {"DUPLICATED/MISSING effects: ledger != status",
                                    "effects applied twice (e.g. a payment taken twice)"}


def declined_with_stock_stuck(run) -> str:
    """A declined order whose stock.restore the stock service refuses: the saga ends `failed`
    with its stock still taken."""
    refuse_compensations(run.ledger_path, participant="stock", seconds=60)
    saga_id = run.order("declined")
    run.finish()
    saga = Saga.objects.get(pk=saga_id)
    assert saga.status == "failed" and saga.failure_reason.startswith("stock.restore")
    assert read_evidence(run.ledger_path).summary[saga_id]["stock_net"] > 0
    return saga_id


def test_a_failed_saga_with_stock_still_taken_fails_a_run_that_scheduled_no_refusal(run):
    saga_id = declined_with_stock_stuck(run)
    assert failing(run.check()) == {"FAILED sagas the schedule did not cause"}
    # nor does a refusal explain it when it was another participant, or long before the saga
    assert failing(run.check(around(saga_id, REFUSE_COMPENSATIONS, "payment"))) == {
        "FAILED sagas the schedule did not cause"}
    assert failing(run.check(around(saga_id, REFUSE_COMPENSATIONS, "stock", offset=-120))) == {
        "FAILED sagas the schedule did not cause"}


def test_a_failed_saga_passes_when_the_schedule_made_its_participant_refuse(run):
    saga_id = declined_with_stock_stuck(run)
    report = run.check(around(saga_id, REFUSE_COMPENSATIONS, "stock"))
    assert report.ok, "\n".join(report.details)


def test_a_failed_saga_must_still_have_undone_what_it_compensated_before(run):
    refuse_compensations(run.ledger_path, participant="stock", seconds=60)
    saga_id = run.order("declined")
    run.finish()
    book(run.ledger_path, saga_id, "payment", "charged", amount="1.00", currency="EUR")  # never refunded
    report = run.check(around(saga_id, REFUSE_COMPENSATIONS, "stock"))
    assert failing(report) == {"failed sagas with an effect left that was compensated before"}


def lose_stock_reduce_replies(body: dict) -> bool:
    return body["command"] == "stock.reduce"


def normal_order_timed_out(run) -> str:
    """A normal order whose stock.reduce replies are all lost: every attempt times out, and the
    saga is compensated (the stock it took is given back)."""
    saga_id = run.order("normal")
    run.finish(lose_reply=lose_stock_reduce_replies)
    saga = Saga.objects.get(pk=saga_id)
    assert (saga.status, saga.failure_reason) == ("compensated", "reduce_stock_timed_out")
    return saga_id


def test_a_normal_order_compensated_by_timeouts_fails_a_run_without_a_fault_that_explains_it(run):
    saga_id = normal_order_timed_out(run)
    rule = "should-complete orders compensated by timeouts no fault explains"
    assert failing(run.check()) == {rule}
    assert failing(run.check(around(saga_id, FLUSH_REDIS))) == {rule}  # a flush delays no reply
    assert failing(run.check(around(saga_id, KILL_CONSUMER, "consumer-1", offset=-120))) == {rule}


@pytest.mark.parametrize("kind", [KILL_CONSUMER, RESTART_RABBITMQ])
def test_a_timed_out_normal_order_passes_when_a_fault_delayed_its_replies(run, kind):
    saga_id = normal_order_timed_out(run)
    report = run.check(around(saga_id, kind))
    assert report.ok, "\n".join(report.details)


def test_a_command_the_participants_received_but_the_timeline_does_not_show_fails(run):
    saga_id = run.order("normal")
    run.finish()
    sent = TimelineEntry.objects.get(saga_id=saga_id, kind="command", command="payment.take")
    ledger = Ledger(run.ledger_path)
    try:  # a second send of attempt 1 is at-least-once delivery; an attempt 2 was never sent
        handle_command(ledger, sent.body)
        handle_command(ledger, {**sent.body, "attempt": 2})
    finally:
        ledger.close()
    report = run.check()
    assert failing(report) == {"commands received that the timeline does not show"}
    assert report.row("  commands received more often than sent (at-least-once)").value == 1
    assert f"received, not in the timeline: {saga_id} payment.take #2" in report.details


def test_a_command_the_timeline_shows_but_no_participant_received_fails(run):
    saga_id = run.order("normal")
    run.finish()
    TimelineEntry.objects.create(saga_id=saga_id, at=Saga.objects.get(pk=saga_id).updated_at, kind="command",
                                 command="order.cancel", attempt=1)
    assert failing(run.check()) == {"commands sent that no participant received"}


def test_participants_count_every_delivery_and_a_refusal_lapses(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    command = {"saga_id": "s-1", "command": "stock.restore", "attempt": 1, "payload": {"items": []}}
    try:
        refuse_compensations(path, participant="stock", seconds=0.3)
        assert handle_command(ledger, command)["reason"] == "compensation_refused"
        assert handle_command(ledger, {**command, "command": "payment.refund"})["status"] == "success"
        time.sleep(0.35)
        assert handle_command(ledger, {**command, "attempt": 2})["status"] == "success"
        handle_command(ledger, {**command, "command": "stock.explode"})  # unknown: dropped, still counted
        handle_command(ledger, "not a command")  # no envelope: nothing to count it by
    finally:
        ledger.close()
    assert read_evidence(path).received == {("s-1", "stock.restore", 1): 1, ("s-1", "payment.refund", 1): 1,
                                            ("s-1", "stock.restore", 2): 1, ("s-1", "stock.explode", 1): 1}


COMMANDS = ("stock.reduce", "stock.restore", "payment.take", "payment.refund", "order.create", "order.cancel")
PAYLOAD = {"items": [{"product_id": "sku-1", "quantity": 2}, {"product_id": "sku-2", "quantity": 1}],
           "user_id": "alice", "amount": "44.48", "currency": "EUR", "payment_method": "pm-1"}


@given(st.lists(st.tuples(st.sampled_from(COMMANDS), st.integers(1, 4)), min_size=1, max_size=14))
@hypothesis_settings(max_examples=300, deadline=None)
def test_no_delivery_order_makes_the_checker_see_a_doubled_effect(deliveries):
    """The doubled-effect oracle has no false alarms: whatever arrives in whatever order, as often
    as at-least-once delivery brings it, the participants apply each effect at most once, and
    every delivery is counted under its (saga, command, attempt)."""
    ledger = Ledger(":memory:")
    try:
        for name, attempt in deliveries:
            handle_command(ledger, {"saga_id": "s-1", "command": name, "attempt": attempt, "payload": PAYLOAD})
        assert doubled_effects(ledger.effects()) == {}
        assert ledger.received() == dict(Counter(("s-1", name, attempt) for name, attempt in deliveries))
    finally:
        ledger.close()


def test_plan_faults_names_the_refusing_participant_and_refuses_an_unknown_kind():
    [fault] = plan_faults(seed=3, count=1, window=(0, 10), consumers=2, kinds=(REFUSE_COMPENSATIONS,))
    assert fault.kind == REFUSE_COMPENSATIONS and fault.target in PARTICIPANTS and fault.down >= 5
    with pytest.raises(ValueError, match="unknown fault kinds kill_everything"):
        plan_faults(seed=3, count=1, window=(0, 10), consumers=2, kinds=("kill_everything",))


def test_the_runner_summary_shows_the_new_rows_and_the_failed_sagas_the_schedule_caused(run, tmp_path):
    from lab.faults.runner import Happening, ScenarioConfig, ScenarioResult
    from lab.faults.schedule import Fault

    saga_id = declined_with_stock_stuck(run)
    window = around(saga_id, REFUSE_COMPENSATIONS, "stock")
    fault = Fault(at=0.0, kind=REFUSE_COMPENSATIONS, target="stock", down=window.end - window.start)
    throughput = dict.fromkeys(["accepted_per_s", "send_seconds", "finished_per_s", "completed_per_s",
                                "finish_seconds", "latency_p50", "latency_p95", "latency_max"], 0.0)
    result = ScenarioResult(ScenarioConfig(seed=1).resolved(), run.check(window), throughput,
                            [Happening(0.0, fault.describe(), fault=fault)], 1.0, tmp_path)
    summary = result.summary()
    for row in ("effects applied twice", "FAILED sagas the schedule did not cause",
                "commands received that the timeline does not show", "commands sent that no participant received",
                "should-complete orders compensated by timeouts no fault explains"):
        assert row in summary
    assert summary.splitlines()[-1] == ("RESULT: all checks passed; 1 failed sagas reported above (compensation"
                                        " gave up: staff must act), 1 of them made so by the schedule's refusals")
