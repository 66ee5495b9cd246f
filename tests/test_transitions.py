"""The one transition path (sagas.transitions, through services.apply_replies): a round of
replies is judged with the same rules as one alone; a transition that loses its compare-and-set,
or trips the inbox, leaves no row behind, although its statements went out together in one
pipeline; and a round of plain replies costs one cache read, one transaction, one cache write."""
import json
import uuid

import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django_redis import get_redis_connection
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from sagas import engine, flows, live_state, records, services
from sagas.flows import Flow
from sagas.models import OutboxMessage, Saga, TimelineEntry
from sagas.services import IncomingReply
from sagas.vocabulary import ReplyFate
from tests.test_engine import SHIPPING

pytestmark = pytest.mark.django_db(transaction=True)

ITEMS = [{"product_id": "sku-1", "quantity": 1}]


STOCK_DONE = engine.Reply("stock.reduce", 1, "success", data={"total": "9.99"})
PAID = engine.Reply("payment.take", 1, "success")
APPLIED, IGNORED, DEAD_LETTERED = ReplyFate.APPLIED, ReplyFate.IGNORED, ReplyFate.DEAD_LETTERED


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


def apply(*replies: IncomingReply) -> list[services.ReplyOutcome]:
    return services.apply_replies(list(replies))


def fates(outcomes) -> list:
    return [outcome.fate for outcome in outcomes]


def sent(saga_id: str) -> list[str]:
    return list(OutboxMessage.objects.filter(saga_id=saga_id).order_by("id").values_list("routing_key", flat=True))


def test_a_reply_decided_on_a_stale_redis_state_is_rolled_back_and_judged_again(started_saga):
    stale = live_state.read_state(started_saga)
    apply(IncomingReply(started_saga, STOCK_DONE, "m-1"))
    put_back_in_redis(stale)  # so the same reply looks new

    [outcome] = apply(IncomingReply(started_saga, STOCK_DONE, "m-2"))

    assert outcome.fate == IGNORED and "duplicate" in outcome.note
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


def test_a_round_is_judged_with_the_rules_of_one_reply_alone(fresh_redis, fresh_queues):
    a, b, c = start(), start(), start()
    unknown = str(uuid.uuid4())
    outcomes = apply(
        IncomingReply(a, STOCK_DONE, "m-a"),
        IncomingReply(b, STOCK_DONE, "m-b"),
        IncomingReply(a, PAID, "m-a2"),  # a's second: judged after a's first is committed
        IncomingReply(c, STOCK_DONE, "m-c", redelivered=True),  # may have been applied: the inbox says not
        IncomingReply(b, STOCK_DONE, "m-b", redelivered=True),  # b's first again: applied a moment ago
        IncomingReply(unknown, STOCK_DONE, "m-x"),
    )

    assert fates(outcomes) == [APPLIED, APPLIED, APPLIED, APPLIED, IGNORED, DEAD_LETTERED]
    assert outcomes[5].note == f"unknown saga {unknown}"
    versions = dict(Saga.objects.filter(pk__in=[a, b, c]).values_list("id", "version"))
    assert [versions[uuid.UUID(s)] for s in (a, b, c)] == [3, 2, 2]
    assert sent(a) == ["stock.reduce", "payment.take", "order.create"]
    assert sent(b) == sent(c) == ["stock.reduce", "payment.take"]
    assert [live_state.read_state(s).version for s in (a, b, c)] == [3, 2, 2]
    ignored = TimelineEntry.objects.get(saga_id=b, kind="reply", applied=False)
    assert ignored.redelivered and ignored.note == outcomes[4].note


def test_a_round_of_plain_replies_is_one_cache_read_one_transaction_and_one_cache_write(
        fresh_redis, fresh_queues, monkeypatch):
    saga_ids = [start() for _ in range(5)]
    calls = []
    for name in ("read_states", "write_states"):
        real = getattr(live_state, name)
        monkeypatch.setattr(live_state, name, lambda states, real=real, name=name: calls.append(name) or real(states))

    with CaptureQueriesContext(connection) as queries:
        outcomes = apply(*(IncomingReply(s, STOCK_DONE) for s in saga_ids))

    assert fates(outcomes) == [APPLIED] * 5
    assert calls == ["read_states", "write_states"]
    statements = [" ".join(q["sql"].split()[:3]) for q in queries.captured_queries]
    # one transaction: a compare-and-set per saga (one statement, run for each), the timeline
    # (a reply and a command each) and the outbox rows; no read of the record
    assert statements == ["BEGIN", "5 times: UPDATE", "10 times: INSERT", "5 times: INSERT", "COMMIT"], statements


def test_a_lost_compare_and_set_rolls_the_round_back_and_judges_each_saga_again_alone(fresh_redis, fresh_queues):
    a, b = start(), start()
    stale_b = live_state.read_state(b)
    apply(IncomingReply(b, STOCK_DONE, "m-b"))
    put_back_in_redis(stale_b)

    outcomes = apply(IncomingReply(a, STOCK_DONE, "m-a"), IncomingReply(b, STOCK_DONE, "m-b2"))

    assert fates(outcomes) == [APPLIED, IGNORED] and "duplicate" in outcomes[1].note
    assert Saga.objects.get(pk=a).version == 2 and sent(a) == ["stock.reduce", "payment.take"]
    assert TimelineEntry.objects.filter(saga_id=a, kind="reply").count() == 1  # the rolled-back one left nothing
    assert Saga.objects.get(pk=b).version == 2 and sent(b) == ["stock.reduce", "payment.take"]


def test_a_reply_judged_on_a_cache_that_is_behind_is_judged_again_on_the_record(started_saga):
    stale = live_state.read_state(started_saga)
    apply(IncomingReply(started_saga, STOCK_DONE, "m-1"))
    put_back_in_redis(stale)  # the cache says stock.reduce is awaited; the record says payment.take
    [outcome] = apply(IncomingReply(started_saga, PAID, "m-2"))
    assert outcome.fate == APPLIED  # on the cache it would have been an unexpected reply, ignored
    assert Saga.objects.get(pk=started_saga).current_step == "create_order"


def test_a_saga_finishes_on_the_flow_version_it_started_on_when_a_new_version_is_registered(fresh_redis, fresh_queues):
    old = start()
    order_v2 = flows.register(Flow("order", 2, (*flows.ORDER_FLOW.steps, SHIPPING)))
    try:
        new = start()  # new sagas start on the newest version
        assert [tuple(Saga.objects.filter(pk=s).values_list("flow_name", "flow_version").get()) for s in (old, new)] \
            == [("order", 1), ("order", 2)]
        for saga_id in (old, new):
            for reply in (STOCK_DONE, PAID, engine.Reply("order.create", 1, "success", data={"order_id": "o-1"})):
                assert fates(apply(IncomingReply(saga_id, reply))) == [APPLIED]
        assert Saga.objects.get(pk=old).status == "completed"  # v1 has three steps
        assert sent(old)[-1] == "saga.completed"
        assert (Saga.objects.get(pk=new).status, sent(new)[-1]) == ("running", "shipping.dispatch")
    finally:
        flows.unregister(order_v2)


REPLIES = [
    STOCK_DONE, engine.Reply("stock.reduce", 1, "failure", reason="out_of_stock"), engine.Reply("stock.reduce", 2, "success",
                                                                                                  data={"total": "9.99"}),
    PAID, engine.Reply("payment.take", 1, "failure", reason="declined"), engine.Reply("stock.restore", 1, "success"),
    engine.Reply("order.create", 1, "success", data={"order_id": "o-1"}),
]


def outline(saga_id: str) -> tuple:
    saga = Saga.objects.get(pk=saga_id)
    state = saga.engine_state()
    return saga.status, saga.version, saga.current_step, tuple((s.name, s.status, s.attempts) for s in state.steps)


@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 3).flatmap(lambda sagas: st.lists(
    st.tuples(st.integers(0, sagas - 1), st.sampled_from(REPLIES), st.booleans()), min_size=1, max_size=8)))
def test_a_round_never_ends_otherwise_than_its_replies_applied_one_by_one(fresh_redis, fresh_queues, round_):
    sagas = 1 + max(position for position, _, _ in round_)
    together, alone = [start() for _ in range(sagas)], [start() for _ in range(sagas)]

    def replies(saga_ids):
        return [IncomingReply(saga_ids[p], reply, f"m-{n}", redelivered) for n, (p, reply, redelivered) in enumerate(round_)]

    outcomes_together = apply(*replies(together))
    outcomes_alone = [outcome for reply in replies(alone) for outcome in apply(reply)]

    assert [(o.fate, o.note) for o in outcomes_together] == [(o.fate, o.note) for o in outcomes_alone]
    assert [outline(s) for s in together] == [outline(s) for s in alone]
    assert [sent(s) for s in together] == [sent(s) for s in alone]
