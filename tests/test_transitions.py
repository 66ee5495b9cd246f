"""Transitions written to the record: alone or several together, a transition that loses its
compare-and-set, or trips the inbox, leaves no row behind, although its statements went out
together in one pipeline."""
import json
import uuid

import pytest
from django.db import IntegrityError, transaction
from django_redis import get_redis_connection

from sagas import engine, flows, live_state, records, services
from sagas.flows import Flow
from sagas.models import OutboxMessage, Saga, TimelineEntry
from tests.test_engine import SHIPPING

pytestmark = pytest.mark.django_db(transaction=True)

ITEMS = [{"product_id": "sku-1", "quantity": 1}]


STOCK_DONE = engine.Reply("stock.reduce", 1, "success", data={"total": "9.99"})


def start() -> str:
    saga, created = services.start_order_saga(user_id="u-1", items=ITEMS, currency="EUR", payment_method="pm-1")
    assert created
    return str(saga.id)


@pytest.fixture
def started_saga(fresh_redis, fresh_queues) -> str:
    return start()


def put_back_in_redis(state: engine.SagaState) -> None:
    """As if Redis had lost the newer state and held this older one again."""
    get_redis_connection("default").hset(live_state.key(state.saga_id), mapping={
        "version": state.version, "state": json.dumps(engine.state_to_dict(state))})


def sent(saga_id: str) -> list[str]:
    return list(OutboxMessage.objects.filter(saga_id=saga_id).order_by("id").values_list("routing_key", flat=True))


def test_a_reply_decided_on_a_stale_redis_state_is_rolled_back_and_judged_again(started_saga):
    stale = live_state.read_state(started_saga)
    services.handle_reply(saga_id=started_saga, reply=STOCK_DONE, message_id="m-1")
    put_back_in_redis(stale)  # so the same reply looks new

    decision = services.handle_reply(saga_id=started_saga, reply=STOCK_DONE, message_id="m-2")

    assert not decision.changed and "duplicate" in decision.note
    saga = Saga.objects.get(pk=started_saga)
    assert (saga.version, saga.current_step) == (2, "take_payment")
    applied = TimelineEntry.objects.filter(saga_id=started_saga, kind="reply", applied=True)
    assert list(applied.values_list("message_id", flat=True)) == ["m-1"]
    assert sent(started_saga) == ["stock.reduce", "payment.take"]


def test_a_constraint_broken_inside_a_pipeline_raises_djangos_integrity_error(started_saga):
    Saga.objects.filter(pk=started_saga).update(idempotency_key="key-1")
    twin = Saga.objects.get(pk=started_saga)
    twin.id = uuid.uuid4()  # same user, same Idempotency-Key
    with pytest.raises(IntegrityError), transaction.atomic(), records.pipeline():
        records.insert([twin])
    assert Saga.objects.count() == 1


def test_replies_for_several_sagas_are_applied_together_and_the_rest_left_for_one_by_one(fresh_redis, fresh_queues):
    a, b, c = start(), start(), start()
    incoming = [
        services.IncomingReply(a, STOCK_DONE, "m-a"),
        services.IncomingReply(b, STOCK_DONE, "m-b"),
        services.IncomingReply(a, engine.Reply("payment.take", 1, "success"), "m-a2"),  # a's second: after a's first
        services.IncomingReply(c, STOCK_DONE, "m-c", redelivered=True),  # may have been applied: ask the inbox
    ]

    assert services.handle_replies(incoming) == [True, True, False, False]

    versions = dict(Saga.objects.filter(pk__in=[a, b, c]).values_list("id", "version"))
    assert [versions[uuid.UUID(s)] for s in (a, b, c)] == [2, 2, 1]
    assert sent(a) == sent(b) == ["stock.reduce", "payment.take"] and sent(c) == ["stock.reduce"]
    assert [live_state.read_state(s).version for s in (a, b, c)] == [2, 2, 1]
    assert services.handle_reply(saga_id=a, reply=incoming[2].reply, message_id="m-a2").changed
    assert services.handle_reply(saga_id=c, reply=STOCK_DONE, message_id="m-c", redelivered=True).changed


def test_replies_applied_together_are_all_rolled_back_if_one_saga_moved_meanwhile(fresh_redis, fresh_queues):
    a, b = start(), start()
    stale_b = live_state.read_state(b)
    services.handle_reply(saga_id=b, reply=STOCK_DONE, message_id="m-b")
    put_back_in_redis(stale_b)

    applied = services.handle_replies([services.IncomingReply(a, STOCK_DONE, "m-a"),
                                        services.IncomingReply(b, STOCK_DONE, "m-b2")])

    assert applied == [False, False]
    assert Saga.objects.get(pk=a).version == 1 and sent(a) == ["stock.reduce"]
    assert not TimelineEntry.objects.filter(saga_id=a, kind="reply").exists()
    assert services.handle_reply(saga_id=a, reply=STOCK_DONE, message_id="m-a").changed
    assert not services.handle_reply(saga_id=b, reply=STOCK_DONE, message_id="m-b2").changed


def test_a_saga_finishes_on_the_flow_version_it_started_on_when_a_new_version_is_registered(fresh_redis, fresh_queues):
    old = start()
    order_v2 = flows.register(Flow("order", 2, (*flows.ORDER_FLOW.steps, SHIPPING)))
    try:
        new = start()  # new sagas start on the newest version
        assert [tuple(Saga.objects.filter(pk=s).values_list("flow_name", "flow_version").get()) for s in (old, new)] \
            == [("order", 1), ("order", 2)]
        for saga_id in (old, new):
            for reply in (STOCK_DONE, engine.Reply("payment.take", 1, "success"),
                          engine.Reply("order.create", 1, "success", data={"order_id": "o-1"})):
                assert services.handle_reply(saga_id=saga_id, reply=reply).changed
        assert Saga.objects.get(pk=old).status == "completed"  # v1 has three steps
        assert sent(old)[-1] == "saga.completed"
        assert (Saga.objects.get(pk=new).status, sent(new)[-1]) == ("running", "shipping.dispatch")
    finally:
        flows.unregister(order_v2)
