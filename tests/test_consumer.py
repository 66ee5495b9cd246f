"""The consumer process: competing consumers, clean stop on SIGTERM, and the outbox when the
broker or the database is away."""
import collections
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
import requests

from lab.stack import ROOT, Stack, free_port
from sagas import engine, flows
from sagas.broker import DEAD_LETTER_QUEUE, HEADERS_DROPPED, Broker
from sagas.consumer import MAX_HANDLER_TRIES, TRIES_HEADER, TRIES_SIGNATURE_HEADER, SagaConsumer
from sagas.flows import Flow
from sagas.models import OutboxMessage, Saga, TimelineEntry
from sagas.runtime import Runtime
from tests import hostile_bus
from tests.conftest import ORDER, database_url, finished, in_thread, wait_for
from tests.test_engine import SHIPPING

pytestmark = [pytest.mark.integration]


def test_competing_consumers_apply_each_transition_once(saga_stack, settings):
    settings.SAGA_STEP_TIMEOUT_SECONDS = 1.0  # sku-silent-once makes deadlines pass: all consumers look at once
    extra = [SagaConsumer(Runtime.for_consumer(Broker()), deadline_check_seconds=0.05) for _ in range(2)]
    threads = [in_thread(consumer.run, f"extra-consumer-{i}") for i, consumer in enumerate(extra)]
    products = ["sku-1", "sku-silent-once", "sku-sold-out", "sku-dup", "sku-2"]
    saga_ids = []
    for i in range(40):
        body = {**ORDER, "items": [{"product_id": products[i % len(products)], "quantity": 1}]}
        saga_ids.append(saga_stack.create_order(body).json()["saga_id"])
    try:
        outcomes = collections.Counter((finished(saga_id, timeout=60).status, Saga.objects.get(pk=saga_id).failure_reason)
                                       for saga_id in saga_ids)
    finally:
        for consumer in extra:
            consumer.stop()
        for thread in threads:
            thread.join(timeout=10)
    assert outcomes == {("completed", None): 32, ("compensated", "out_of_stock"): 8}
    sent = TimelineEntry.objects.filter(saga_id__in=saga_ids, kind="command").values_list("saga_id", "command", "attempt")
    doubled = [key for key, count in collections.Counter(sent).items() if count > 1]
    assert doubled == []
    applied = TimelineEntry.objects.filter(saga_id__in=saga_ids, kind="reply", applied=True)
    for saga in Saga.objects.filter(pk__in=saga_ids):
        assert saga.version == 1 + applied.filter(saga=saga).count() + saga.timeline.filter(kind="timeout").count()


def test_sigterm_stops_the_consumer_cleanly(transactional_db, fresh_queues):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": database_url()}
    process = subprocess.Popen([sys.executable, "manage.py", "run_saga_consumer"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    wait_for(lambda: any("consuming" in line for line in lines), timeout=30, what="the consumer to start")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    reader.join(timeout=5)
    assert any("consumer stopped" in line for line in lines)


def test_with_the_broker_away_orders_are_accepted_and_run_once_it_is_back(saga_stack, settings, outbox_publisher):
    settings.SAGA_STEP_TIMEOUT_SECONDS = 10  # the relay, not a resend, must deliver the first command
    port = settings.RABBITMQ["port"]
    settings.RABBITMQ = {**settings.RABBITMQ, "port": 1}  # nothing listens there
    response = saga_stack.create_order()
    assert response.status_code == 202
    saga_id = response.json()["saga_id"]
    wait_for(outbox_publisher.idle, timeout=10, what="the web publisher to give up")
    assert OutboxMessage.objects.filter(saga_id=saga_id, sent_at__isnull=True).count() == 1
    settings.RABBITMQ = {**settings.RABBITMQ, "port": port}
    saga = finished(saga_id, timeout=30)
    assert saga.status == "completed"
    assert saga.engine_state().step("reduce_stock").attempts == 1  # the consumer's relay sent it
    wait_for(lambda: not OutboxMessage.objects.filter(saga_id=saga_id, sent_at__isnull=True).exists(),
             what="every outbox row marked sent")


def test_with_the_database_away_create_order_answers_503(tmp_path, auth_service):
    stack = Stack.create(log_dir=tmp_path, web_port=free_port(), auth_port=auth_service.server_port,
                         DJANGO_SETTINGS_MODULE="tests.settings", DATABASE_URL="postgres://postgres@127.0.0.1:1/nowhere")
    stack.start_web()
    try:
        stack.wait_web()
        response = requests.post(f"http://127.0.0.1:{stack.web_port}/orders/create_order", json=ORDER,
                                 headers={"Authorization": "Bearer demo-alice"}, timeout=30)
        assert response.status_code == 503
        assert "nothing was started" in json.loads(response.content)["detail"]
    finally:
        stack.stop_all()


# --- the outage of issue 8: one hostile reply must not stop or block the consumer -------------


def applied_replies(saga_ids):
    return TimelineEntry.objects.filter(saga_id__in=saga_ids, kind="reply", applied=True).count()


def dead_letters(broker, count):
    taken = []
    wait_for(lambda: taken.extend(broker.drain(DEAD_LETTER_QUEUE)) or len(taken) >= count,
             what=f"{count} dead letters")
    return taken


@pytest.fixture
def replies_consumer(transactional_db, consumer):
    """The consumer thread, on the real broker and database, and a broker to read its dead letters."""
    broker = Broker()
    yield consumer
    broker.close()


@pytest.mark.parametrize("nested", [
    b'{"a":' * 700 + b"1" + b"}" * 700,  # ~5 KB; the 2 KB one of the report: 1000 brackets
    b"[" * 2000,
    hostile_bus.good_reply("6f1c1a8e-4c6f-4d7e-9a55-0c3b2f3d9e11")[:-1] + b',"x":' + b"[" * 1000 + b"]" * 1000 + b"}",
])
def test_a_deeply_nested_reply_is_set_aside_and_the_consumer_carries_on(replies_consumer, nested):
    saga_ids = hostile_bus.awaiting_sagas(2)
    hostile_bus.publish_round([hostile_bus.Outgoing(nested)] * 2
                              + [hostile_bus.Outgoing(hostile_bus.good_reply(s)) for s in saga_ids])
    broker = Broker()
    dead = dead_letters(broker, 2)
    assert [d.body for d in dead] == [nested, nested]
    assert all("nested deeper" in d.headers["x-dead-letter-reason"] for d in dead)
    wait_for(lambda: applied_replies(saga_ids) == 2, what="the good replies behind it")
    assert replies_consumer.dead_lettered == 2
    broker.close()


def test_a_header_pika_cannot_decode_does_not_cut_the_connection_forever(replies_consumer):
    saga_ids = hostile_bus.awaiting_sagas(2)
    hostile_bus.publish_round([
        hostile_bus.Outgoing(hostile_bus.good_reply(saga_ids[0]), headers={"when": hostile_bus.huge_timestamp()}),
        hostile_bus.Outgoing(hostile_bus.good_reply(saga_ids[1])),
    ])
    wait_for(lambda: applied_replies(saga_ids) == 2, what="both replies applied")
    assert Broker().drain(DEAD_LETTER_QUEUE) == []


@pytest.fixture
def engine_bug_for(monkeypatch):
    """Make the engine raise while deciding a reply of the given sagas (a bug that only these
    replies meet); returns the saga ids it raised for, one per call."""
    raised, doomed, real = [], set(), engine.on_reply

    def on_reply(flow, state, reply, **kwargs):
        if state.saga_id in doomed:
            raised.append(state.saga_id)
            raise KeyError("a bug that only this reply meets")
        return real(flow, state, reply, **kwargs)

    monkeypatch.setattr(engine, "on_reply", on_reply)

    def doom(*saga_ids):
        doomed.update(saga_ids)
        return raised

    return doom


@pytest.mark.parametrize("tries", ["junk", 2, "2", "2.forged-signature", "²", -1, -(2**62), 2**62,
                                   hostile_bus.Raw(struct.pack(">cd", b"d", 2.5)), None, [1], {"n": 1}, b"\xff", True])
def test_a_forged_tries_header_neither_loops_nor_skips_the_handler(replies_consumer, engine_bug_for, tries):
    saga_id, = hostile_bus.awaiting_sagas(1)
    calls = engine_bug_for(saga_id)
    forged = {TRIES_HEADER: tries, TRIES_SIGNATURE_HEADER: "forged"}
    hostile_bus.publish_round([hostile_bus.Outgoing(hostile_bus.good_reply(saga_id), headers=forged)])
    broker = Broker()
    (dead,) = dead_letters(broker, 1)
    assert f"handler failed {MAX_HANDLER_TRIES} times" in dead.headers["x-dead-letter-reason"]
    assert calls == [saga_id] * MAX_HANDLER_TRIES  # each counted try, no more, no fewer
    broker.close()


def test_a_handler_bug_for_one_reply_leaves_the_rest_of_its_round_applied(replies_consumer, engine_bug_for):
    saga_ids = hostile_bus.awaiting_sagas(4)
    doomed = saga_ids[1]
    calls = engine_bug_for(doomed)
    hostile_bus.publish_round([hostile_bus.Outgoing(hostile_bus.good_reply(s)) for s in saga_ids])
    broker = Broker()
    (dead,) = dead_letters(broker, 1)
    assert dead.body == hostile_bus.good_reply(doomed)
    assert "KeyError" in dead.headers["x-dead-letter-reason"]
    assert calls == [doomed] * MAX_HANDLER_TRIES
    wait_for(lambda: applied_replies(saga_ids) == 3, what="the other three applied")
    # the timeline line is written just after the dead letter is published
    wait_for(lambda: TimelineEntry.objects.filter(saga_id=doomed, kind="dead_letter").exists(), timeout=10,
             what="the dead letter on the saga's timeline")
    assert Saga.objects.get(pk=doomed).version == 1  # nothing of it was written
    broker.close()


def test_headers_we_cannot_copy_are_dropped_from_the_dead_letter_not_the_reason(replies_consumer):
    huge = {f"h{n}": "x" * 1000 for n in range(100)}  # ~100 KB: with our reason over the frame size
    body = b"not json"
    hostile_bus.publish_round([hostile_bus.Outgoing(body, headers=huge, message_id=b"\xff\xfe", correlation_id="\x00")])
    (dead,) = dead_letters(Broker(), 1)
    assert dead.body == body
    assert "not valid UTF-8 JSON" in dead.headers["x-dead-letter-reason"]
    assert "over" in dead.headers[HEADERS_DROPPED]


@pytest.fixture
def shipping_flow():
    """A flow with a shipping step, registered beside the order flow for the test's length."""
    flow = flows.register(Flow("order-shipped", 1, (*flows.ORDER_FLOW.steps, SHIPPING)))
    yield flow
    flows.unregister(flow)


def test_a_reply_for_a_command_not_in_the_sagas_flow_is_dead_lettered_with_why(replies_consumer, shipping_flow):
    saga_id, = hostile_bus.awaiting_sagas(1)  # an order v1 saga: it has no shipping step
    body = hostile_bus.good_reply(saga_id, command="shipping.dispatch", data={"shipment_id": "sh-1"})
    hostile_bus.publish_round([hostile_bus.Outgoing(body)])
    (dead,) = dead_letters(Broker(), 1)
    assert dead.body == body
    assert dead.headers["x-dead-letter-reason"] == (
        f"shipping.dispatch is not a command of flow order v1, which saga {saga_id} runs on")
    # the timeline line is written just after the dead letter is published
    wait_for(lambda: TimelineEntry.objects.filter(saga_id=saga_id, kind="dead_letter").exists(), timeout=10,
             what="the dead letter on the saga's timeline")
    assert Saga.objects.get(pk=saga_id).version == 1  # nothing else changed


class BusyConsumer(SagaConsumer):
    """The real loop over a queue of the test's own, with replies that take a few milliseconds
    each to apply; records when its deadline checks and relays ran."""

    def __init__(self, *args, expected: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.expected, self.handled, self.deadline_checks, self.relays = expected, 0, [], []

    def handle_round(self, deliveries):
        time.sleep(0.003 * len(deliveries))
        self.handled += len(deliveries)
        self.stopping = self.handled >= self.expected
        return deliveries, []

    def check_deadlines(self):
        self.deadline_checks.append(self.handled)

    def relay(self):
        self.relays.append(time.monotonic())


def test_a_backlog_does_not_starve_the_outbox_relay_and_holds_back_the_deadlines(transactional_db, private_queue):
    """Found by the fault run: with a backlog of replies the consumer's tick did not run until the
    queue was empty, and the outbox relay with it: unsent rows (commands the web process could not
    publish) waited tens of seconds. The relay now runs during a backlog; the deadline check still
    waits for the backlog (running it then caused a storm of resends)."""
    backlog = 600
    publisher = Broker()
    for _ in range(backlog):
        publisher.publish(exchange="", routing_key=private_queue, body=b"{}")
    publisher.close()
    consumer = BusyConsumer(Runtime.for_consumer(Broker()), queue=private_queue, expected=backlog)
    started = time.monotonic()

    thread = in_thread(consumer.run, "busy-consumer")
    thread.join(timeout=60)
    assert not thread.is_alive(), "the consumer did not drain the backlog within 60 s"

    assert consumer.handled == backlog
    gaps = [later - earlier for earlier, later in zip([started, *consumer.relays], consumer.relays)]
    assert time.monotonic() - started > 1.5 and gaps and max(gaps) < 1.5, f"{len(consumer.relays)} relays"
    assert set(consumer.deadline_checks) <= {backlog}  # held back while the backlog lasted


def test_a_backlog_that_never_ends_holds_the_deadlines_back_only_so_long(transactional_db, private_queue):
    """Found in review: a sender flooding saga.replies (junk is cheap to dead-letter) kept the
    consumer in a backlog for good, and every resend, give-up and compensation with it. The
    deadline check now waits for a backlog at most `deadline_hold_seconds`."""
    backlog = 1500
    publisher = Broker()
    for _ in range(backlog):
        publisher.publish(exchange="", routing_key=private_queue, body=b"{}")
    publisher.close()
    consumer = BusyConsumer(Runtime.for_consumer(Broker()), queue=private_queue, expected=backlog,
                            deadline_hold_seconds=1.0)
    started = time.monotonic()
    thread = in_thread(consumer.run, "flooded-consumer")
    thread.join(timeout=90)
    assert not thread.is_alive(), "the consumer did not drain the backlog within 90 s"
    elapsed = time.monotonic() - started
    during = [handled for handled in consumer.deadline_checks if handled < backlog]
    assert during, f"no deadline check during a backlog of {elapsed:.1f} s"
    assert len(during) <= elapsed / 1.0 + 1  # still held back: about one a second, not one every tick
