"""PARTICIPANT_USERS: a reply counts only when RabbitMQ vouches (user_id) that the participant owning
the command sent it. Real users on the real broker, created for the test and deleted after."""
import subprocess
import uuid

import pytest
from django.conf import settings

from orchestration_site.env import ConfigError
from orchestration_site.settings import _participant_users
from sagas import engine
from sagas.broker import DEAD_LETTER_QUEUE, Broker
from sagas.consumer import SagaConsumer
from sagas.models import TimelineEntry
from sagas.runtime import Runtime
from tests import hostile_bus
from tests.conftest import in_thread, wait_for

pytestmark = [pytest.mark.integration]


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def participant_users():
    """One RabbitMQ user per participant, allowed only to publish to the default exchange."""
    vhost, users = settings.RABBITMQ["vhost"], {}
    for participant in ("stock", "payment", "order"):
        name = f"orch-consumer-{participant}-{uuid.uuid4().hex[:8]}"
        rabbitmqctl("add_user", name, "secret-" + name)
        users[participant] = name
        rabbitmqctl("set_permissions", "-p", vhost, name, "^$", r"^amq\.default$", "^$")
    yield users
    for name in users.values():
        rabbitmqctl("delete_user", name)


@pytest.fixture
def guarded_consumer(transactional_db, fast_deadlines, fresh_redis, fresh_queues, participant_users, settings):
    settings.SAGA_STEP_TIMEOUT_SECONDS = 60
    consumer = SagaConsumer(Runtime.for_consumer(Broker()), participant_users=participant_users)
    thread = in_thread(consumer.run, "guarded-consumer")
    yield consumer
    consumer.stop()
    thread.join(timeout=10)


def test_only_the_participant_that_owns_the_command_may_answer_it(guarded_consumer, participant_users):
    genuine, forged, unsigned = hostile_bus.awaiting_sagas(3)
    stock, payment = participant_users["stock"], participant_users["payment"]
    hostile_bus.publish_round([hostile_bus.Outgoing(hostile_bus.good_reply(genuine), user_id=stock)],
                              user=stock, password="secret-" + stock)
    hostile_bus.publish_round([hostile_bus.Outgoing(hostile_bus.good_reply(forged), user_id=payment)],
                              user=payment, password="secret-" + payment)
    hostile_bus.publish_round([hostile_bus.Outgoing(hostile_bus.good_reply(unsigned))],
                              user=stock, password="secret-" + stock)
    broker, dead = Broker(), []
    wait_for(lambda: dead.extend(broker.drain(DEAD_LETTER_QUEUE)) or len(dead) >= 2, what="two forged replies")
    broker.close()
    assert sorted(d.body for d in dead) == sorted([hostile_bus.good_reply(forged), hostile_bus.good_reply(unsigned)])
    assert all(d.headers["x-dead-letter-reason"].startswith("forged:") for d in dead)
    assert all(stock in d.headers["x-dead-letter-reason"] for d in dead)
    wait_for(lambda: TimelineEntry.objects.filter(saga_id=genuine, kind="reply", applied=True).exists(),
             what="the genuine reply applied")
    assert not TimelineEntry.objects.filter(saga_id__in=[forged, unsigned], kind="reply").exists()


def test_rabbitmq_refuses_a_user_id_that_is_not_the_senders(participant_users):
    stock, payment = participant_users["stock"], participant_users["payment"]
    with pytest.raises(Exception, match="PRECONDITION_FAILED|user_id"):
        hostile_bus.publish_round([hostile_bus.Outgoing(b"{}", user_id=stock)], user=payment, password="secret-" + payment)


@pytest.mark.parametrize("raw", ["stock=a,payment=b", "stock=a,payment=b,order=", "stock=a,payment=b,order=c,stock=d",
                                 "stock=a,payment=b,shipping=c", "stock", ","])
def test_a_bad_participant_users_value_stops_the_start_naming_the_variable(raw):
    with pytest.raises(ConfigError, match="PARTICIPANT_USERS"):
        _participant_users(raw)


def test_participant_users_unset_believes_anyone_and_set_maps_each_participant():
    assert _participant_users(None) == {}
    assert _participant_users(" stock=stock-svc, payment=pay-svc ,order=order-svc") == {
        "stock": "stock-svc", "payment": "pay-svc", "order": "order-svc"}


def test_a_genuine_reply_whose_handling_failed_once_is_not_taken_for_forged(guarded_consumer, participant_users,
                                                                           monkeypatch):
    """Found in review: the retry copy we publish carries our own connection's user (none), so the
    second try judged it forged. A validly signed tries count says we checked it already."""
    (saga_id,) = hostile_bus.awaiting_sagas(1)
    real, failed = engine.on_reply, []

    def on_reply(flow, state, reply, **kwargs):  # a bug this reply meets once
        if state.saga_id == saga_id and not failed:
            failed.append(reply)
            raise KeyError("once")
        return real(flow, state, reply, **kwargs)

    monkeypatch.setattr(engine, "on_reply", on_reply)
    stock = participant_users["stock"]
    hostile_bus.publish_round([hostile_bus.Outgoing(hostile_bus.good_reply(saga_id), user_id=stock)],
                              user=stock, password="secret-" + stock)
    wait_for(lambda: TimelineEntry.objects.filter(saga_id=saga_id, kind="reply", applied=True).exists(),
             what="the genuine reply applied on its second try")
    assert failed
    broker = Broker()
    assert broker.drain(DEAD_LETTER_QUEUE) == []
    broker.close()
