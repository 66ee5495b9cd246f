"""The broker's rounds, on the real broker: the deliveries that arrived together come as one
round, each is acked once or put back, and consuming starts again after a lost connection."""
import time

import pytest
from django.conf import settings

from sagas.broker import Broker


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
