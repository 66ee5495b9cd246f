"""The plain-SQL mirror writes: a transition that loses its compare-and-set, or trips the inbox,
leaves no row behind, although its statements went out together in one pipeline."""
import uuid

import pytest
from django.db import IntegrityError, transaction
from django_redis import get_redis_connection

from sagas import engine, mirror, services, store
from sagas.models import OutboxMessage, Saga, TimelineEntry

pytestmark = pytest.mark.django_db(transaction=True)

ITEMS = [{"product_id": "sku-1", "quantity": 1}]


@pytest.fixture
def started_saga(fresh_redis, fresh_queues) -> str:
    saga, created = services.start_order_saga(user_id="u-1", items=ITEMS, currency="EUR", payment_method="pm-1")
    assert created
    return str(saga.id)


def test_a_reply_decided_on_a_stale_redis_state_is_rolled_back_and_judged_again(started_saga):
    stale = store.read_state(started_saga)
    stock_done = engine.Reply("stock.reduce", 1, "success", data={"total": "9.99"})
    services.handle_reply(saga_id=started_saga, reply=stock_done, message_id="m-1")
    # Redis loses the newer state and holds the old one again, so the same reply looks new
    get_redis_connection("default").hset(f"orchestrator:saga:{started_saga}", mapping={
        "version": stale.version, "state": store.json.dumps(engine.state_to_dict(stale))})

    decision = services.handle_reply(saga_id=started_saga, reply=stock_done, message_id="m-2")

    assert not decision.changed and "duplicate" in decision.note
    saga = Saga.objects.get(pk=started_saga)
    assert (saga.version, saga.current_step) == (2, "take_payment")
    applied = TimelineEntry.objects.filter(saga_id=started_saga, kind="reply", applied=True)
    assert list(applied.values_list("message_id", flat=True)) == ["m-1"]
    sent = OutboxMessage.objects.filter(saga_id=started_saga).order_by("id")
    assert list(sent.values_list("routing_key", flat=True)) == ["stock.reduce", "payment.take"]


def test_a_constraint_broken_inside_a_pipeline_raises_djangos_integrity_error(started_saga):
    Saga.objects.filter(pk=started_saga).update(idempotency_key="key-1")
    twin = Saga.objects.get(pk=started_saga)
    twin.id = uuid.uuid4()  # same user, same Idempotency-Key
    with pytest.raises(IntegrityError), transaction.atomic(), mirror.pipeline():
        mirror.insert([twin])
    assert Saga.objects.count() == 1
