"""The outbox relay and the publish path, on the real broker: a row the broker will not take waits
out a growing delay while the rows behind it go out; a deleted queue is declared again; a publish
that gets no confirm gives up at its deadline; and a stalled broker never holds up an order."""
import time
import uuid
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from lab.faults import infra
from sagas import outbox
from sagas.broker import (
    COMMANDS_EXCHANGE,
    EVENTS_EXCHANGE,
    PUBLISH_DEADLINE_SECONDS,
    Broker,
    BrokerUnavailable,
    PublishTimeout,
    Refused,
    Unroutable,
)
from sagas.models import OutboxMessage, Saga
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

UNBOUND_KEY = "nobody.listens"  # no queue is bound to it on saga.commands: unroutable


@pytest.fixture
def broker():
    broker = Broker()
    yield broker
    broker.close()


@pytest.fixture
def saga():
    return Saga.objects.create(user_id="u-outbox", currency="EUR", items=[], state={})


def command_row(saga, routing_key="stock.reduce") -> OutboxMessage:
    body = {"saga_id": str(saga.pk), "command": routing_key, "attempt": 1, "payload": {}}
    return OutboxMessage.objects.create(saga=saga, exchange=COMMANDS_EXCHANGE, routing_key=routing_key, body=body)


def event_row(saga) -> OutboxMessage:
    return OutboxMessage.objects.create(saga=saga, exchange=EVENTS_EXCHANGE, routing_key="saga.completed",
                                        body={"saga_id": str(saga.pk), "status": "completed"})


def message_ids(deliveries) -> list[str]:
    return [delivery.message_id for delivery in deliveries]


@given(st.integers(min_value=0, max_value=64))
def test_the_retry_delay_grows_and_is_capped(attempts):
    delay, following = outbox.retry_delay(attempts + 1), outbox.retry_delay(attempts + 2)
    assert outbox.RETRY_FIRST_SECONDS <= delay <= following <= outbox.RETRY_MAX_SECONDS
    assert following == min(2 * delay, outbox.RETRY_MAX_SECONDS)


def test_an_unroutable_row_is_retried_with_a_growing_delay_while_later_rows_go_out(saga, broker, fresh_queues):
    first, poison, later = command_row(saga), command_row(saga, UNBOUND_KEY), command_row(saga, "payment.take")

    assert outbox.relay_pending(broker=broker, older_than=0) == 2
    assert message_ids(broker.drain("stock.commands")) == [str(first.message_id)]
    assert message_ids(broker.drain("payment.commands")) == [str(later.message_id)]
    poison.refresh_from_db()
    assert poison.sent_at is None and poison.attempts == 1
    assert poison.next_attempt_at - timezone.now() > timedelta(seconds=outbox.RETRY_FIRST_SECONDS * 0.5)

    assert outbox.relay_pending(broker=broker, older_than=0) == 0  # waiting out its delay: not tried
    poison.refresh_from_db()
    assert poison.attempts == 1

    OutboxMessage.objects.filter(pk=poison.pk).update(next_attempt_at=timezone.now())  # the delay is over
    assert outbox.relay_pending(broker=broker, older_than=0) == 0
    poison.refresh_from_db()
    assert poison.sent_at is None and poison.attempts == 2  # still kept, never dropped
    assert poison.next_attempt_at - timezone.now() > timedelta(seconds=outbox.retry_delay(2) * 0.75)


@hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["command", "event", "poison"]), min_size=1, max_size=8))
def test_one_relay_round_sends_every_good_row_whatever_poison_rows_come_before(saga, broker, kinds):
    OutboxMessage.objects.all().delete()
    broker.purge("stock.commands")
    events = broker.bind_temporary_queue(EVENTS_EXCHANGE, "saga.#")
    make = {"command": command_row, "event": event_row, "poison": lambda s: command_row(s, UNBOUND_KEY)}
    rows = [make[kind](saga) for kind in kinds]

    sent = outbox.relay_pending(broker=broker, older_than=0)

    good = [row for row, kind in zip(rows, kinds) if kind != "poison"]
    assert sent == len(good)
    published = message_ids(broker.drain("stock.commands")) + message_ids(broker.drain(events))
    assert sorted(published) == sorted(str(row.message_id) for row in good)
    for row, kind in zip(rows, kinds):
        row.refresh_from_db()
        assert (row.sent_at is None, row.attempts) == ((True, 1) if kind == "poison" else (False, 0))


def test_a_writer_publishes_past_a_refused_row_and_leaves_rows_past_its_window_to_the_relay(saga, broker, fresh_queues):
    poison, fresh, stale = command_row(saga, UNBOUND_KEY), command_row(saga), command_row(saga)
    OutboxMessage.objects.filter(pk=stale.pk).update(created_at=timezone.now() - timedelta(seconds=outbox.RELAY_AFTER_SECONDS))
    stale.refresh_from_db()
    marker = outbox.SentMarker()
    outbox.DirectPublisher(broker, marker=marker).publish([poison, fresh, stale])
    marker.stop()
    assert message_ids(broker.drain("stock.commands")) == [str(fresh.message_id)]
    assert list(OutboxMessage.objects.filter(sent_at__isnull=False).values_list("pk", flat=True)) == [fresh.pk]


def test_a_deleted_participant_queue_is_declared_again_and_the_row_goes_out(saga, broker, fresh_queues):
    broker.connect()  # the topology is declared now; then someone deletes a queue
    infra.delete_queue(settings.RABBITMQ["vhost"], "stock.commands")
    assert not infra.queue_exists(settings.RABBITMQ["vhost"], "stock.commands")
    row = command_row(saga)

    assert outbox.relay_pending(broker=broker, older_than=0) == 1
    row.refresh_from_db()
    assert row.sent_at is not None and row.attempts == 0
    assert message_ids(broker.drain("stock.commands")) == [str(row.message_id)]


def test_a_publish_that_gets_no_confirm_gives_up_at_its_deadline(stalling_proxy):
    broker = Broker(publish_deadline=0.5)
    broker.connect()
    stalling_proxy.stall()
    started = time.monotonic()
    with pytest.raises(PublishTimeout):
        broker.publish(exchange=EVENTS_EXCHANGE, routing_key="saga.completed", body=b"{}", mandatory=False)
    assert 0.5 <= time.monotonic() - started < 3.0
    assert not broker.connected  # dropped: the next publish opens a fresh connection


def test_a_terminal_event_the_relay_cannot_publish_stays_until_confirmed(saga, stalling_proxy):
    broker = Broker(publish_deadline=0.5)
    broker.connect()
    row = event_row(saga)
    stalling_proxy.stall()

    assert outbox.relay_pending(broker=broker, older_than=0) == 0
    row.refresh_from_db()
    assert row.sent_at is None and row.attempts == 1

    stalling_proxy.flow()
    OutboxMessage.objects.filter(pk=row.pk).update(next_attempt_at=timezone.now())  # the delay is over
    assert outbox.relay_pending(broker=broker, older_than=0) == 1
    row.refresh_from_db()
    assert row.sent_at is not None
    broker.close()


def test_an_idle_publisher_notices_a_dead_peer_by_its_heartbeats(stalling_proxy):
    broker = Broker(heartbeat=1)
    publisher = outbox.BackgroundPublisher(broker=broker, idle_tick=0.2)
    broker.connect()
    publisher.publish([])  # starts its thread
    stalling_proxy.stall()
    try:
        wait_for(lambda: not broker.connected, timeout=20, what="the heartbeat checker to drop the silent connection")
    finally:
        publisher.stop()


def test_create_order_answers_at_once_while_the_broker_is_stalled_and_the_relay_sends_it_later(
        transactional_db, fresh_queues, api, stalling_proxy, outbox_publisher):
    warm = api.create_order().json()["saga_id"]  # the publisher's connection is open through the proxy
    wait_for(lambda: OutboxMessage.objects.filter(saga_id=warm, sent_at__isnull=False).exists(), timeout=10,
             what="the first order's command to be published")
    stalling_proxy.stall()

    started = time.monotonic()
    response = api.create_order(HTTP_IDEMPOTENCY_KEY=str(uuid.uuid4()))
    assert response.status_code == 202
    assert time.monotonic() - started < PUBLISH_DEADLINE_SECONDS  # it never waited on the broker
    row = OutboxMessage.objects.get(saga_id=response.json()["saga_id"])
    wait_for(outbox_publisher.idle, timeout=15, what="the web publisher to give up on the stalled broker")
    row.refresh_from_db()
    assert row.sent_at is None

    stalling_proxy.flow()
    relay = Broker()
    try:
        wait_for(lambda: outbox.relay_pending(broker=relay) == 1, timeout=outbox.RELAY_AFTER_SECONDS + 10, interval=0.5,
                 what="the relay to send the row")
    finally:
        relay.close()
    row.refresh_from_db()
    assert row.sent_at is not None
    # at least once: the publish that gave up may have reached the broker too once bytes flowed
    assert str(row.message_id) in message_ids(Broker().drain("stock.commands"))


OUTCOMES = {"confirmed": lambda: None, "unroutable": lambda: Unroutable("no queue"), "refused": lambda: Refused("nack"),
            "timed out": lambda: PublishTimeout("no confirm"), "connection lost": lambda: BrokerUnavailable("lost")}


class ScriptedBroker:
    """The outcomes a broker gives each message, in publish order (the rounds' accounting alone)."""

    def __init__(self, script: list[str]):
        self.script, self.published = list(script), []

    def connect(self) -> None:
        pass

    def publish_all(self, messages):
        self.published += [m.message_id for m in messages]
        return [OUTCOMES[self.script.pop(0)]() for _ in messages]


@hypothesis_settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=st.lists(st.sampled_from(sorted(OUTCOMES)), min_size=1, max_size=3 * outbox.PUBLISH_ROUND))
def test_every_confirmed_row_is_marked_sent_and_a_lost_connection_counts_against_one_row(script):
    rows = [OutboxMessage(pk=n, saga_id=uuid.uuid4(), exchange=COMMANDS_EXCHANGE, routing_key="stock.reduce",
                          body={"attempt": 1}, created_at=timezone.now()) for n in range(len(script))]
    broker = ScriptedBroker(script)

    sent, failed = outbox._send(rows, broker)

    # the rounds go out until one loses the connection; the rest wait for the relay
    lost_round = next((n // outbox.PUBLISH_ROUND for n, kind in enumerate(script)
                       if kind in ("timed out", "connection lost")), None)
    tried = len(script) if lost_round is None else min(len(script), (lost_round + 1) * outbox.PUBLISH_ROUND)
    assert broker.published == [str(row.message_id) for row in rows[:tried]]
    assert sent == [n for n in range(tried) if script[n] == "confirmed"]  # confirmed behind a lost one too
    first_lost = [n for n in range(tried) if script[n] in ("timed out", "connection lost")][:1]
    assert [row.pk for row in failed] == sorted(
        [n for n in range(tried) if script[n] in ("unroutable", "refused")] + first_lost)
