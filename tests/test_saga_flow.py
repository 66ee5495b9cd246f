"""Real sagas through RabbitMQ, Redis and PostgreSQL, with the consumer and the demo participants running."""
import json
import threading
from decimal import Decimal

import pytest
from django_redis import get_redis_connection

from demo.participants import Ledger, ledger_summary, start_participants
from sagas import flows
from sagas.broker import DEAD_LETTER_QUEUE, EVENTS_EXCHANGE, REPLIES_QUEUE, Broker
from sagas.flows import Flow
from sagas.live_state import key
from sagas.models import OutboxMessage, Saga, TimelineEntry
from tests.conftest import ORDER, finished, wait_for
from tests.test_engine import SHIPPING

pytestmark = [pytest.mark.integration]


def order_of(*product_ids, payment_method="pm-123"):
    return {"items": [{"product_id": p, "quantity": 1} for p in product_ids], "currency": "EUR",
            "payment_method": payment_method}


def start(api, body=ORDER, **headers):
    response = api.create_order(body, **headers)
    assert response.status_code == 202, response.content
    return response.json()["saga_id"]


def commands_sent(saga):
    return [(e.command, e.attempt) for e in saga.timeline.filter(kind=TimelineEntry.Kind.COMMAND).order_by("id")]


def test_a_saga_completes_and_tells_related_services(saga_stack, participants):
    events = Broker()
    events_queue = events.bind_temporary_queue(EVENTS_EXCHANGE, "saga.*")
    saga_id = start(saga_stack)
    saga = finished(saga_id)
    assert saga.status == "completed"
    assert saga.total is not None and str(saga.total) == "19.98" and saga.order_id
    assert commands_sent(saga) == [("stock.reduce", 1), ("payment.take", 1), ("order.create", 1)]
    assert [step.status for step in saga.engine_state().steps] == ["succeeded"] * 3
    body = saga_stack.saga(saga_id).json()
    assert body["status"] == "completed" and body["total"] == "19.98" and body["order_id"] == saga.order_id
    (event,) = events.drain(events_queue)
    assert event.routing_key == "saga.completed"
    assert json.loads(event.body) == {"saga_id": saga_id, "status": "completed", "user_id": "alice",
                                      "order_id": saga.order_id, "items": ORDER["items"], "total": "19.98",
                                      "currency": "EUR", "failure_reason": None}
    events.close()
    assert ledger_summary(participants)[saga_id] == {"stock_net": 2, "paid_net": Decimal("19.98"), "orders_open": 1}
    wait_for(lambda: not OutboxMessage.objects.filter(sent_at__isnull=True).exists(), what="every outbox row marked sent")


def test_out_of_stock_fails_at_the_first_step_with_nothing_to_undo(saga_stack):
    saga = finished(start(saga_stack, order_of("sku-sold-out")))
    assert (saga.status, saga.failure_reason) == ("compensated", "out_of_stock")
    assert commands_sent(saga) == [("stock.reduce", 1)]


def test_declined_payment_restores_the_stock(saga_stack, participants):
    saga_id = start(saga_stack, order_of("sku-1", payment_method="pm-declined"))
    saga = finished(saga_id)
    assert (saga.status, saga.failure_reason) == ("compensated", "payment_declined")
    assert commands_sent(saga) == [("stock.reduce", 1), ("payment.take", 1), ("stock.restore", 1)]
    assert ledger_summary(participants)[saga_id]["stock_net"] == 0


def test_a_rejected_order_refunds_the_payment_then_restores_the_stock(saga_stack, participants):
    saga_id = start(saga_stack, order_of("sku-unorderable"))
    saga = finished(saga_id)
    assert (saga.status, saga.failure_reason) == ("compensated", "order_rejected")
    assert commands_sent(saga) == [("stock.reduce", 1), ("payment.take", 1), ("order.create", 1),
                                   ("payment.refund", 1), ("stock.restore", 1)]
    assert ledger_summary(participants)[saga_id] == {"stock_net": 0, "paid_net": Decimal("0"), "orders_open": 0}


def test_a_silent_participant_gets_the_command_again(saga_stack):
    saga = finished(start(saga_stack, order_of("sku-silent-once")))
    assert saga.status == "completed"
    assert commands_sent(saga)[:2] == [("stock.reduce", 1), ("stock.reduce", 2)]
    assert saga.engine_state().step("reduce_stock").attempts == 2


def test_a_step_that_never_answers_is_given_up_and_compensated(saga_stack, settings, participants):
    settings.SAGA_STEP_MAX_ATTEMPTS = 1  # sku-silent-once drops the first stock.reduce
    saga_id = start(saga_stack, order_of("sku-silent-once"))
    saga = finished(saga_id)
    assert (saga.status, saga.failure_reason) == ("compensated", "reduce_stock_timed_out")
    # real time passes here: a slow machine may resend the undo, so the outcome is asserted, not the count
    sent = commands_sent(saga)
    assert sent[:2] == [("stock.reduce", 1), ("stock.restore", 1)] and {c for c, _ in sent[1:]} == {"stock.restore"}
    assert ledger_summary(participants).get(saga_id, {"stock_net": 0})["stock_net"] == 0


def test_duplicate_replies_change_nothing(saga_stack):
    saga = finished(start(saga_stack, order_of("sku-dup")))
    assert saga.status == "completed"
    wait_for(lambda: saga.timeline.filter(kind="reply", applied=False).exists(), what="the duplicate reply")
    ignored = saga.timeline.filter(kind="reply", applied=False).first()
    assert ignored.command == "stock.reduce" and "duplicate" in ignored.note
    assert commands_sent(saga) == [("stock.reduce", 1), ("payment.take", 1), ("order.create", 1)]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b'{"saga_id": "x"}', "saga_id is not a UUID"),
        (json.dumps({"saga_id": "6f1c1a8e-4c6f-4d7e-9a55-0c3b2f3d9e11", "command": "stock.reduce", "attempt": 1,
                     "status": "success", "reason": None, "data": {}}).encode(), "without a decimal data.total"),
        (b"x" * 70_000, "over the"),
    ],
)
def test_poison_replies_are_dead_lettered_with_the_reason_and_the_next_one_is_processed(saga_stack, body, reason):
    broker = Broker()
    broker.publish(exchange="", routing_key=REPLIES_QUEUE, body=body)
    saga = finished(start(saga_stack))  # the consumer carries on behind the poison
    assert saga.status == "completed"
    (dead,) = wait_for(lambda: broker.drain(DEAD_LETTER_QUEUE), what="the dead letter")
    assert dead.body == body
    assert reason in dead.headers["x-dead-letter-reason"]
    broker.close()


def test_a_reply_for_an_unknown_saga_is_set_aside(saga_stack):
    broker = Broker()
    reply = {"saga_id": "6f1c1a8e-4c6f-4d7e-9a55-0c3b2f3d9e11", "command": "payment.take", "attempt": 1,
             "status": "success", "reason": None, "data": {}}
    broker.publish(exchange="", routing_key=REPLIES_QUEUE, body=json.dumps(reply).encode())
    (dead,) = wait_for(lambda: broker.drain(DEAD_LETTER_QUEUE), what="the dead letter")
    assert "unknown saga" in dead.headers["x-dead-letter-reason"]
    broker.close()


def test_redis_flushed_mid_saga_is_rebuilt_from_the_database(saga_stack, settings):
    settings.SAGA_STEP_TIMEOUT_SECONDS = 5
    saga_id = start(saga_stack, order_of("sku-slow"))  # 1.5 s in the stock step
    wait_for(lambda: get_redis_connection("default").exists(key(saga_id)), what="the saga in Redis")
    get_redis_connection("default").flushdb()
    saga = finished(saga_id)
    assert saga.status == "completed"
    assert commands_sent(saga) == [("stock.reduce", 1), ("payment.take", 1), ("order.create", 1)]
    assert get_redis_connection("default").exists(key(saga_id))


def test_idempotency_key_reuse_runs_one_saga(saga_stack):
    first = saga_stack.create_order(ORDER, HTTP_IDEMPOTENCY_KEY="checkout-7")
    again = saga_stack.create_order(ORDER, HTTP_IDEMPOTENCY_KEY="checkout-7")
    assert again.json()["saga_id"] == first.json()["saga_id"]
    saga = finished(first.json()["saga_id"])
    assert saga.status == "completed"
    assert commands_sent(saga) == [("stock.reduce", 1), ("payment.take", 1), ("order.create", 1)]


def test_redelivered_reply_after_redis_flush_is_a_no_op(saga_stack):
    saga = finished(start(saga_stack))
    get_redis_connection("default").flushdb()
    reply = {"saga_id": str(saga.id), "command": "payment.take", "attempt": 1, "status": "failure",
             "reason": "late_decline", "data": None}
    broker = Broker()
    broker.publish(exchange="", routing_key=REPLIES_QUEUE, body=json.dumps(reply).encode(), message_id="m-late")
    entry = wait_for(lambda: saga.timeline.filter(message_id="m-late").first(), what="the late reply on the timeline")
    broker.close()
    assert not entry.applied
    saga.refresh_from_db()
    assert saga.status == "completed"


def test_a_reply_whose_handling_keeps_failing_is_tried_three_times_then_set_aside(saga_stack):
    saga_id = start(saga_stack, order_of("sku-slow"))
    # a bug's stand-in: the saga's stored state is unreadable, in the database and in Redis
    Saga.objects.filter(pk=saga_id).update(state={"broken": True})
    get_redis_connection("default").flushdb()
    broker = Broker()
    (dead,) = wait_for(lambda: broker.drain(DEAD_LETTER_QUEUE), what="the dead letter")
    broker.close()
    assert dead.headers["x-saga-handler-tries"] == 2
    assert "handler failed 3 times" in dead.headers["x-dead-letter-reason"]
    assert json.loads(dead.body)["saga_id"] == saga_id
    entry = wait_for(lambda: TimelineEntry.objects.filter(saga_id=saga_id, kind="dead_letter").first(),
                     what="the dead letter on the timeline")
    assert "handler failed" in entry.reason


@pytest.fixture
def order_flow_with_shipping():
    """The order flow changes under the running service: version 2 adds a shipping step after the
    order is created (new sagas start on it; the demo's Shipping participant serves it)."""
    flow = flows.register(Flow(flows.ORDER_FLOW.name, flows.ORDER_FLOW.version + 1, (*flows.ORDER_FLOW.steps, SHIPPING)))
    yield flow
    flows.unregister(flow)


@pytest.fixture
def participants_with_shipping(tmp_path, fresh_queues):
    stop, ledger = threading.Event(), tmp_path / "ledger.sqlite3"
    threads = start_participants(ledger_path=ledger, should_stop=stop.is_set, with_shipping=True)
    yield ledger
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    assert not [t.name for t in threads if t.is_alive()], "participants did not stop within 10 s"


def test_a_four_step_flow_runs_through_the_real_stack(transactional_db, api, order_flow_with_shipping,
                                                      participants_with_shipping, consumer):
    saga_id = start(api)
    saga = finished(saga_id, timeout=30)
    assert (saga.status, saga.flow_name, saga.flow_version) == ("completed", "order", order_flow_with_shipping.version)
    assert [step["name"] for step in saga.state["steps"]] == ["reduce_stock", "take_payment", "create_order", "ship"]
    effects = Ledger(participants_with_shipping).effects(saga_id)
    (shipped,) = [e for e in effects if e["participant"] == "shipping"]
    assert shipped["effect"] == "dispatched" and saga.state["facts"]["shipment_id"] == shipped["reference"]
    assert commands_sent(saga)[-1] == ("shipping.dispatch", 1)
