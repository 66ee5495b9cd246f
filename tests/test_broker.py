"""The consume loop's rounds, on the real broker: the deliveries that arrived together go to
`handle_batch` first, the rest to `handle` one by one, and each is acked exactly once."""
from sagas.broker import Broker


def test_a_round_goes_to_handle_batch_first_and_the_rest_one_by_one_each_acked_once(private_queue):
    broker = Broker()
    sent = [str(n).encode() for n in range(40)]
    for body in sent:
        broker.publish(exchange="", routing_key=private_queue, body=body)
    rounds, taken_together, one_by_one = [], [], []

    def handle_batch(deliveries):
        rounds.append(len(deliveries))
        evens = {position for position, d in enumerate(deliveries) if int(d.body) % 2 == 0}
        taken_together.extend(deliveries[position].body for position in evens)
        return evens

    broker.consume(private_queue, lambda delivery: one_by_one.append(delivery.body), prefetch=50, handle_batch=handle_batch,
                   should_stop=lambda: len(taken_together) + len(one_by_one) >= len(sent))

    assert max(rounds) > 1
    assert sorted(taken_together + one_by_one, key=int) == sent
    assert broker.drain(private_queue) == []  # every one was acked: none came back when the consumer stopped
    broker.close()


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
