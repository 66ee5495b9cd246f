"""The broker's rounds, on the real broker: the deliveries that arrived together come as one
round, each is acked once or put back, and consuming starts again after a lost connection."""
import time
import uuid
from urllib.parse import quote

import pytest
from django.conf import settings
from hypothesis import HealthCheck, given
from hypothesis import settings as settings_hypothesis
from hypothesis import strategies as st

from sagas.broker import Broker, Message, Refused, Unroutable


def take_rounds(broker, queue, *, until, timeout=10.0) -> list[list]:
    """Rounds from `queue` until `until(rounds)`, within `timeout` seconds (never hangs)."""
    rounds, end = [], time.monotonic() + timeout
    while not until(rounds):
        assert time.monotonic() < end, f"timed out after {timeout}s; rounds so far: {[len(r) for r in rounds]}"
        rounds.append(broker.next_round(queue, prefetch=50, timeout=0.2))
    return rounds


def test_a_round_holds_what_arrived_together_and_each_delivery_is_acked_once_or_put_back(private_queue):
    broker = Broker()
    sent = [str(n).encode() for n in range(40)]
    for body in sent:
        broker.publish(exchange="", routing_key=private_queue, body=body)
    acked, put_back, rounds, end = [], [], [], time.monotonic() + 15

    while len(acked) < len(sent):
        assert time.monotonic() < end, f"timed out; {len(acked)} acked"
        deliveries = broker.next_round(private_queue, prefetch=50, timeout=0.2)
        rounds.append(deliveries)
        odd_first_time = [d for d in deliveries if int(d.body) % 2 and not d.redelivered]
        broker.nack(odd_first_time)
        broker.ack([d for d in deliveries if d not in odd_first_time])
        put_back += [d.body for d in odd_first_time]
        acked += [d.body for d in deliveries if d not in odd_first_time]

    assert max(len(r) for r in rounds) > 1
    assert sorted(acked, key=int) == sent  # each once
    assert sorted(put_back, key=int) == sent[1::2]  # and those put back came back, redelivered
    broker.close()
    assert Broker().drain(private_queue) == []  # none came back when the connection closed: all acked


@pytest.mark.parametrize("publish_reconnects", [False, True], ids=["connection-closed", "another-connection-opened"])
def test_rounds_come_again_after_a_publish_lost_the_connection(private_queue, publish_reconnects):
    """Found by the fault run: a RabbitMQ restart during a deadline check made the consumer's
    publish close the shared connection; the loop then crashed (None.process_data_events), or, if
    a later publish had already reconnected, polled a connection with no consumer on it."""
    broker, outsider = Broker(), Broker()
    outsider.publish(exchange="", routing_key=private_queue, body=b'"before"')
    [before] = [d for r in take_rounds(broker, private_queue, until=lambda rounds: any(rounds)) for d in r]
    broker.ack([before])
    broker.close()  # what Broker.publish does when the broker went away mid-publish
    if publish_reconnects:  # the next publish finds the broker back, on a connection with no consumer
        broker.publish(exchange="", routing_key=private_queue, body=b'"after"')
    else:
        outsider.publish(exchange="", routing_key=private_queue, body=b'"after"')
    rounds = take_rounds(broker, private_queue, until=lambda rounds: any(rounds))
    assert [d.body for r in rounds for d in r] == [b'"after"']
    broker.close()
    outsider.close()


def test_the_plain_consume_loop_acks_what_it_handled_and_puts_back_what_failed(private_queue):
    broker, handled, failed_once = Broker(), [], set()
    for n in range(10):
        broker.publish(exchange="", routing_key=private_queue, body=str(n).encode())

    def handle(delivery):
        if delivery.body == b"3" and delivery.body not in failed_once:
            failed_once.add(delivery.body)
            raise ValueError("a participant's bug")
        handled.append(delivery.body)

    end = time.monotonic() + 15
    broker.consume(private_queue, handle, prefetch=5,
                   should_stop=lambda: len(handled) >= 10 or time.monotonic() > end)
    assert sorted(handled, key=int) == [str(n).encode() for n in range(10)]
    broker.close()
    assert Broker().drain(private_queue) == []


def test_the_topology_declares_a_command_queue_for_each_participant_of_a_registered_flow():
    from sagas import flows
    from sagas.broker import participant_queues
    from tests.test_engine import SHIPPING

    assert "shipping.commands" not in participant_queues()
    flow = flows.register(flows.Flow("order-shipped", 1, (*flows.ORDER_FLOW.steps, SHIPPING)))
    try:
        queues = participant_queues()
    finally:
        flows.unregister(flow)
    assert queues["shipping.commands"] == "shipping.*"
    assert {queues[q] for q in ("stock.commands", "payment.commands", "order.commands")} == {"stock.*", "payment.*", "order.*"}


def test_every_message_carries_the_user_rabbitmq_vouches_for(private_queue):
    """So a participant can tell the orchestrator's commands from ones another participant put in
    its queue through the default exchange (RabbitMQ refuses a user_id that is not the sender's)."""
    broker = Broker()
    broker.publish(exchange="", routing_key=private_queue, body=b"{}")
    (delivery,) = broker.drain(private_queue)
    broker.close()
    assert delivery.user_id == settings.RABBITMQ["user"]


KINDS = ("confirmed", "unroutable", "refused", "event nobody hears")


@pytest.fixture
def refusing_queue():
    """A queue that nacks every message published to it (no room, reject-publish)."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(
        f"amqp://{settings.RABBITMQ['user']}:{settings.RABBITMQ['password']}@{settings.RABBITMQ['host']}:"
        f"{settings.RABBITMQ['port']}/{quote(settings.RABBITMQ['vhost'], safe='')}"))
    name = f"tests.refusing.{uuid.uuid4().hex}"
    connection.channel().queue_declare(name, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    yield name
    connection.channel().queue_delete(name)
    connection.close()


@settings_hypothesis(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=12))
def test_a_round_of_messages_is_confirmed_together_and_each_gets_its_own_outcome(private_queue, refusing_queue, kinds):
    broker = Broker()
    messages = []
    for number, kind in enumerate(kinds):
        routing_key = {"confirmed": private_queue, "unroutable": f"nowhere.{uuid.uuid4().hex}",
                       "refused": refusing_queue, "event nobody hears": f"nowhere.{uuid.uuid4().hex}"}[kind]
        messages.append(Message(exchange="", routing_key=routing_key, body=str(number).encode(),
                                mandatory=kind != "event nobody hears"))

    outcomes = broker.publish_all(messages)

    expected = {"confirmed": type(None), "unroutable": Unroutable, "refused": Refused, "event nobody hears": type(None)}
    assert [type(outcome) for outcome in outcomes] == [expected[kind] for kind in kinds]
    arrived = [d.body for d in broker.drain(private_queue)]
    assert arrived == [str(n).encode() for n, kind in enumerate(kinds) if kind == "confirmed"]  # each once, in order
    assert broker.connected  # refusals and returns leave the connection as it was
    broker.close()
