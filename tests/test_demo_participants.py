"""The demo participants' rules, called without a broker; the Shipping worker over the real broker; the demo
auth service over HTTP."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid
from decimal import Decimal

import pytest
from django.conf import settings
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from demo.catalogue import PLENTY, PRODUCTS, Product
from demo.participants import (
    SHIPPING_QUEUE,
    Ledger,
    handle_command,
    ledger_summary,
    reply_plan,
    reset_ledger,
    start_participants,
)
from lab.faults import infra
from sagas.broker import COMMANDS_EXCHANGE, Broker, encode
from tests.conftest import wait_for

ITEMS = [{"product_id": "sku-1", "quantity": 2}, {"product_id": "sku-2", "quantity": 1}]
MONEY = {"user_id": "alice", "amount": "44.48", "currency": "EUR", "payment_method": "pm-123"}


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    yield ledger
    ledger.close()


@pytest.fixture
def saga_id() -> str:
    return str(uuid.uuid4())


def only(product_id: str, quantity: int = 1) -> dict:
    return {"items": [{"product_id": product_id, "quantity": quantity}]}


def command(saga_id: str, name: str, payload: dict | None = None, attempt: int = 1) -> dict:
    if payload is None:
        payload = {"items": ITEMS} if name.startswith("stock.") else dict(MONEY, items=ITEMS)
    return {"saga_id": saga_id, "command": name, "attempt": attempt, "payload": payload}


def test_reduce_stock_replies_the_total_and_takes_the_stock(ledger, saga_id):
    reply = handle_command(ledger, command(saga_id, "stock.reduce"))

    assert reply == {
        "saga_id": saga_id, "command": "stock.reduce", "attempt": 1,
        "status": "success", "reason": None, "data": {"total": "44.48"},
    }
    assert ledger.stock_level("sku-1") == PLENTY - 2
    assert ledger.stock_level("sku-2") == PLENTY - 1
    assert ledger.summary()[saga_id]["stock_net"] == 3


def test_a_repeated_command_gets_the_same_reply_and_no_second_effect(ledger, saga_id):
    forward = ("stock.reduce", "payment.take", "order.create")
    first = {name: handle_command(ledger, command(saga_id, name)) for name in forward}
    again = {name: handle_command(ledger, command(saga_id, name, attempt=3)) for name in first}

    for name in first:
        assert again[name]["attempt"] == 3  # echoes the attempt it answers, so the orchestrator takes it
        assert {k: again[name][k] for k in ("status", "reason", "data")} == {
            k: first[name][k] for k in ("status", "reason", "data")
        }
    assert ledger.stock_level("sku-1") == PLENTY - 2
    assert ledger.summary()[saga_id] == {"stock_net": 3, "paid_net": Decimal("44.48"), "orders_open": 1}
    assert first["order.create"]["data"]["order_id"].startswith("o-")


@pytest.mark.parametrize(
    ("product_id", "reason"), [("sku-sold-out", "out_of_stock"), ("sku-nowhere", "unknown_product")]
)
def test_reduce_fails_as_a_whole_when_one_item_cannot_be_had(ledger, saga_id, product_id, reason):
    items = [{"product_id": "sku-1", "quantity": 1}, {"product_id": product_id, "quantity": 1}]

    reply = handle_command(ledger, command(saga_id, "stock.reduce", {"items": items}))

    assert (reply["status"], reply["reason"]) == ("failure", reason)
    assert ledger.stock_level("sku-1") == PLENTY
    assert ledger.summary() == {}


def test_reduce_fails_when_there_is_not_enough_left(tmp_path, saga_id):
    ledger = Ledger(tmp_path / "small.sqlite3", products={"sku-last": Product(Decimal("1.00"), 2)})

    first = handle_command(ledger, command("saga-a", "stock.reduce", only("sku-last", 2)))
    second = handle_command(ledger, command(saga_id, "stock.reduce", only("sku-last", 1)))

    assert first["status"] == "success"
    assert (second["status"], second["reason"]) == ("failure", "out_of_stock")
    assert ledger.stock_level("sku-last") == 0
    ledger.close()


def test_declined_payment_charges_nothing(ledger, saga_id):
    reply = handle_command(ledger, command(saga_id, "payment.take", dict(MONEY, payment_method="pm-declined")))

    assert (reply["status"], reply["reason"]) == ("failure", "payment_declined")
    assert ledger.summary() == {}


@pytest.mark.parametrize(
    ("forward", "compensation"),
    [("stock.reduce", "stock.restore"), ("payment.take", "payment.refund"), ("order.create", "order.cancel")],
)
def test_compensation_before_its_action_leaves_a_tombstone(ledger, saga_id, forward, compensation):
    undo = handle_command(ledger, command(saga_id, compensation))
    late = handle_command(ledger, command(saga_id, forward))
    undo_again = handle_command(ledger, command(saga_id, compensation, attempt=2))

    assert (undo["status"], undo["reason"]) == ("success", None)
    assert (late["status"], late["reason"]) == ("failure", "already_compensated")
    assert undo_again["status"] == "success"
    assert ledger.effects(saga_id) == []
    assert ledger.stock_level("sku-1") == PLENTY


def test_compensations_undo_an_applied_action_exactly_once(ledger, saga_id):
    # The orchestrator gave up waiting, but the actions had been applied: compensating undoes them.
    for name in ("stock.reduce", "payment.take", "order.create"):
        handle_command(ledger, command(saga_id, name))
    for attempt in (1, 2):
        for name in ("order.cancel", "payment.refund", "stock.restore"):
            assert handle_command(ledger, command(saga_id, name, attempt=attempt))["status"] == "success"
    repeat = handle_command(ledger, command(saga_id, "stock.reduce", attempt=2))

    assert repeat["status"] == "success"  # the same request as before, so the same answer, and no effect
    assert ledger.stock_level("sku-1") == PLENTY
    assert ledger.summary()[saga_id] == {"stock_net": 0, "paid_net": Decimal("0"), "orders_open": 0}
    assert [row["effect"] for row in ledger.effects(saga_id)] == [
        "stock_reduced", "stock_reduced", "charged", "order_created",
        "order_cancelled", "refunded", "stock_restored", "stock_restored",
    ]


@given(
    st.lists(st.sampled_from(["stock.reduce", "stock.restore"]), min_size=1, max_size=8),
)
@hypothesis_settings(max_examples=200, deadline=None)
def test_any_order_of_reduce_and_restore_ends_undone_once_a_restore_is_last(arrivals):
    ledger = Ledger(":memory:")
    arrivals = [*arrivals, "stock.restore"]  # the orchestrator keeps compensating until it succeeds

    replies = [handle_command(ledger, command("saga-1", name, attempt=i + 1)) for i, name in enumerate(arrivals)]

    effects = [row["effect"] for row in ledger.effects()]
    assert effects.count("stock_reduced") == effects.count("stock_restored") <= 2
    assert ledger.stock_level("sku-1") == PLENTY
    answers = {(r["status"], r["reason"], json.dumps(r["data"])) for r in replies if r["command"] == "stock.reduce"}
    assert len(answers) <= 1
    ledger.close()


def test_malformed_commands_are_dropped_and_bad_payloads_fail(ledger, saga_id):
    broken = [
        "nonsense", None, [], {"saga_id": saga_id},
        {"saga_id": saga_id, "command": "stock.reduce", "attempt": 0},
        {"saga_id": saga_id, "command": "stock.explode", "attempt": 1, "payload": {}},
    ]
    for body in broken:
        assert handle_command(ledger, body) is None

    reply = handle_command(ledger, command(saga_id, "payment.take", {"amount": "lots", "currency": "EUR"}))

    assert (reply["status"], reply["reason"]) == ("failure", "invalid_payload")
    assert ledger.summary() == {}


def test_behaviour_triggers(ledger, saga_id):
    silent = command(saga_id, "stock.reduce", only("sku-silent-once"))

    assert handle_command(ledger, silent) is None
    assert handle_command(ledger, dict(silent, attempt=2))["status"] == "success"
    assert ledger.summary()[saga_id]["stock_net"] == 1
    assert reply_plan(command(saga_id, "stock.reduce", only("sku-slow"))).delay == 1.5
    assert reply_plan(command(saga_id, "stock.restore", only("sku-dup"))).copies == 2
    assert reply_plan(command(saga_id, "stock.reduce")) == reply_plan(command(saga_id, "payment.take"))


def test_reset_restocks_and_forgets(tmp_path, saga_id):
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    handle_command(ledger, command(saga_id, "stock.reduce"))
    ledger.close()
    assert ledger_summary(path)[saga_id]["stock_net"] == 3

    reset_ledger(path)

    ledger = Ledger(path)
    assert ledger_summary(path) == {}
    assert ledger.stock_level("sku-1") == PRODUCTS["sku-1"].stock
    ledger.close()


def _get(url: str, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_auth_server_answers_the_contract_over_http(auth_service):
    auth_server = f"http://127.0.0.1:{auth_service.server_port}"
    assert _get(f"{auth_server}/auth/verify", "demo-alice") == (200, {"user_id": "alice", "is_staff": False})
    assert _get(f"{auth_server}/auth/verify", "demo-staff") == (200, {"user_id": "staff", "is_staff": True})
    assert _get(f"{auth_server}/auth/verify", "stolen")[0] == 401
    assert _get(f"{auth_server}/auth/verify")[0] == 401
    assert _get(f"{auth_server}/elsewhere", "demo-alice")[0] == 404


# --- Shipping: the fourth participant, for a four-step flow ---

SHIPMENT = {"order_id": "o-123", "items": ITEMS}


def test_dispatch_replies_a_shipment_id_and_a_repeat_gets_the_same_reply_and_no_second_effect(ledger, saga_id):
    first = handle_command(ledger, command(saga_id, "shipping.dispatch", SHIPMENT))
    again = handle_command(ledger, command(saga_id, "shipping.dispatch", SHIPMENT, attempt=2))

    assert (first["status"], first["reason"]) == ("success", None)
    assert first["data"]["shipment_id"].startswith("sh-")
    assert again["attempt"] == 2 and {k: again[k] for k in ("status", "reason", "data")} == {
        k: first[k] for k in ("status", "reason", "data")}
    assert [(row["effect"], row["reference"]) for row in ledger.effects(saga_id)] == [
        ("dispatched", first["data"]["shipment_id"])]


def test_recall_undoes_a_dispatch_exactly_once(ledger, saga_id):
    shipment_id = handle_command(ledger, command(saga_id, "shipping.dispatch", SHIPMENT))["data"]["shipment_id"]
    recalls = [handle_command(ledger, command(saga_id, "shipping.recall", SHIPMENT, attempt=n)) for n in (1, 2)]

    assert [(r["status"], r["reason"]) for r in recalls] == [("success", None)] * 2
    assert [(row["effect"], row["reference"]) for row in ledger.effects(saga_id)] == [
        ("dispatched", shipment_id), ("recalled", shipment_id)]


def test_recall_before_dispatch_has_no_effect_and_the_late_dispatch_fails(ledger, saga_id):
    recall = handle_command(ledger, command(saga_id, "shipping.recall", {"order_id": "o-123"}))
    late = handle_command(ledger, command(saga_id, "shipping.dispatch", SHIPMENT))

    assert (recall["status"], recall["reason"]) == ("success", None)
    assert (late["status"], late["reason"]) == ("failure", "already_compensated")
    assert ledger.effects(saga_id) == []


@pytest.mark.parametrize("payload", [{}, {"order_id": "", "items": ITEMS}, {"order_id": 7, "items": ITEMS},
                                     {"order_id": "o-1"}, {"order_id": "o-1", "items": []}])
def test_a_dispatch_without_an_order_or_items_fails_with_invalid_payload(ledger, saga_id, payload):
    reply = handle_command(ledger, command(saga_id, "shipping.dispatch", payload))

    assert (reply["status"], reply["reason"]) == ("failure", "invalid_payload")
    assert ledger.effects(saga_id) == []


@given(st.lists(st.sampled_from(["shipping.dispatch", "shipping.recall"]), min_size=1, max_size=8))
@hypothesis_settings(max_examples=200, deadline=None)
def test_any_order_of_dispatch_and_recall_never_ships_twice_and_ends_recalled_once_a_recall_is_last(arrivals):
    ledger = Ledger(":memory:")
    arrivals = [*arrivals, "shipping.recall"]  # the orchestrator keeps compensating until it succeeds

    replies = [handle_command(ledger, command("saga-1", name, SHIPMENT, attempt=i + 1)) for i, name in enumerate(arrivals)]

    effects = [row["effect"] for row in ledger.effects()]
    assert effects.count("dispatched") == effects.count("recalled") <= 1
    answers = {(r["status"], r["reason"], json.dumps(r["data"])) for r in replies if r["command"] == "shipping.dispatch"}
    assert len(answers) <= 1  # every repeat of the dispatch got the first answer
    ledger.close()


def test_the_shipping_worker_declares_its_own_queue_and_answers_over_the_broker(tmp_path, saga_id):
    """The runtime topology does not know shipping.commands: only start_participants(with_shipping=True)
    declares it, and then a shipping.dispatch published to saga.commands is answered."""
    vhost = settings.RABBITMQ["vhost"]
    infra.delete_queue(vhost, SHIPPING_QUEUE)
    broker = Broker()
    reply_queue = broker.bind_temporary_queue("amq.direct", f"tests-shipping-{saga_id}")  # declares the topology too
    assert not infra.queue_exists(vhost, SHIPPING_QUEUE)

    stop = threading.Event()
    threads = start_participants(ledger_path=tmp_path / "ledger.sqlite3", should_stop=stop.is_set, with_shipping=True)
    try:
        wait_for(lambda: infra.queue_exists(vhost, SHIPPING_QUEUE), timeout=15, what="shipping.commands declared")
        body = {"saga_id": saga_id, "command": "shipping.dispatch", "attempt": 1, "payload": SHIPMENT}
        broker.publish(exchange=COMMANDS_EXCHANGE, routing_key="shipping.dispatch",
                       body=encode(body), correlation_id=saga_id, reply_to=reply_queue)
        replies = wait_for(lambda: broker.drain(reply_queue), timeout=15, what="the shipping reply")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        broker.close()
        infra.delete_queue(vhost, SHIPPING_QUEUE)
    assert not [t.name for t in threads if t.is_alive()], "participants did not stop within 10 s"
    assert [thread.name for thread in threads][-1] == f"demo-{SHIPPING_QUEUE}"
    [reply] = replies
    answer = json.loads(reply.body)
    assert (answer["saga_id"], answer["command"], answer["status"]) == (saga_id, "shipping.dispatch", "success")
    assert answer["data"]["shipment_id"].startswith("sh-") and reply.correlation_id == saga_id
