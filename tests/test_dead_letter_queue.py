"""The dead-letter queue's length limit, on the real broker in the tests' vhost: a new queue is
declared with it; a queue declared before the limit existed is kept, and the warning's policy
command gives it the limit."""
import json
import logging
import shlex
import subprocess

import pytest
from django.conf import settings

from lab.faults import infra
from sagas.broker import DEAD_LETTER_POLICY, DEAD_LETTER_QUEUE, Broker, dead_letter_policy_command


def queue_facts(name: str) -> dict:
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", settings.RABBITMQ["vhost"], "name", "arguments",
                          "policy", "--formatter", "json"], capture_output=True, text=True, timeout=60, check=True).stdout
    (facts,) = [queue for queue in json.loads(out) if queue["name"] == name]
    return {**facts, "arguments": {name: value for name, _type, value in facts["arguments"]}}  # [name, type, value]


@pytest.fixture
def no_dead_letter_queue(monkeypatch):
    """The tests' vhost without the dead-letter queue; afterwards it is declared again as the service does."""
    vhost = settings.RABBITMQ["vhost"]
    monkeypatch.setattr("sagas.broker._warned_unlimited", False)
    infra.delete_queue(vhost, DEAD_LETTER_QUEUE)
    yield vhost
    subprocess.run(["rabbitmqctl", "-q", "clear_policy", "-p", vhost, DEAD_LETTER_POLICY],
                   capture_output=True, timeout=60)
    infra.delete_queue(vhost, DEAD_LETTER_QUEUE)
    monkeypatch.undo()
    broker = Broker()
    broker.drain(DEAD_LETTER_QUEUE)
    broker.close()


def publish_dead_letters(broker: Broker, count: int) -> None:
    for number in range(count):
        broker.publish(exchange="", routing_key=DEAD_LETTER_QUEUE, body=str(number).encode())


def test_a_new_dead_letter_queue_keeps_the_newest_messages_up_to_its_limit(no_dead_letter_queue, monkeypatch):
    monkeypatch.setattr("sagas.broker.DEAD_LETTER_LIMIT", 3)
    broker = Broker()
    publish_dead_letters(broker, 5)
    assert [d.body for d in broker.drain(DEAD_LETTER_QUEUE)] == [b"2", b"3", b"4"]  # drop-head: oldest go
    assert queue_facts(DEAD_LETTER_QUEUE)["arguments"] == {"x-max-length": 3, "x-overflow": "drop-head"}
    broker.close()


def test_the_service_declares_the_documented_limit(no_dead_letter_queue):
    broker = Broker()
    broker.drain(DEAD_LETTER_QUEUE)  # connects, so declares the topology
    assert queue_facts(DEAD_LETTER_QUEUE)["arguments"] == {"x-max-length": 100_000, "x-overflow": "drop-head"}
    broker.close()


def test_a_dead_letter_queue_declared_without_the_limit_is_kept_and_the_warning_tells_the_policy_to_apply(
        no_dead_letter_queue, caplog):
    infra.declare_queue(no_dead_letter_queue, DEAD_LETTER_QUEUE)  # as an older version declared it
    broker = Broker()
    with caplog.at_level(logging.WARNING, logger="sagas.broker"):
        publish_dead_letters(broker, 2)  # the connection declares the topology, then publishes on the same channel
    assert [d.body for d in broker.drain(DEAD_LETTER_QUEUE)] == [b"0", b"1"]
    (warning,) = [r for r in caplog.records if "without its length limit" in r.getMessage()]
    command = warning.args[0]
    assert command == dead_letter_policy_command(no_dead_letter_queue)
    assert queue_facts(DEAD_LETTER_QUEUE) == {"name": DEAD_LETTER_QUEUE, "arguments": {}, "policy": ""}

    # the warning's command, run as it is written, puts the limit on the existing queue
    subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60, check=True)
    assert queue_facts(DEAD_LETTER_QUEUE)["policy"] == DEAD_LETTER_POLICY

    Broker().close()
    second = Broker()
    with caplog.at_level(logging.WARNING, logger="sagas.broker"):
        second.drain(DEAD_LETTER_QUEUE)
    assert len([r for r in caplog.records if "without its length limit" in r.getMessage()]) == 1  # once per process
    second.close()
    broker.close()
