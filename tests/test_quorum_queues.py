"""RABBITMQ_QUEUE_TYPE=quorum on this machine's RabbitMQ, in a fresh vhost of the test's own: the
contract's queues are declared quorum (the dead-letter queue keeping its limit), and a queue that
exists as classic refuses the change (PRECONDITION_FAILED): the migration docs/operations.md tells."""
import json
import subprocess
import uuid

import pytest

from sagas.broker import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_LIMIT,
    DEAD_LETTER_QUEUE,
    PARTICIPANT_QUEUES,
    REPLIES_QUEUE,
    Broker,
    BrokerUnavailable,
)


def rabbitmqctl(*argv: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *argv], capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.fixture
def fresh_vhost(settings):
    vhost = f"orch-ops9-quorum-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, settings.RABBITMQ["user"], ".*", ".*", ".*")
    settings.RABBITMQ = {**settings.RABBITMQ, "vhost": vhost}
    yield vhost
    rabbitmqctl("delete_vhost", vhost)


def queues(vhost: str) -> dict[str, dict]:
    out = rabbitmqctl("list_queues", "-p", vhost, "name", "type", "arguments", "--formatter", "json")
    return {q["name"]: {"type": q["type"], "arguments": {n: v for n, _t, v in q["arguments"]}} for q in json.loads(out)}


CONTRACT_QUEUES = {REPLIES_QUEUE, DEAD_LETTER_QUEUE, *PARTICIPANT_QUEUES}


def test_quorum_declares_every_queue_of_the_contract_as_quorum(fresh_vhost, settings):
    settings.RABBITMQ_QUEUE_TYPE = "quorum"
    broker = Broker()
    broker.connect()
    broker.publish(exchange=COMMANDS_EXCHANGE, routing_key="stock.reduce", body=b"{}")  # routed as before
    broker.close()
    declared = queues(fresh_vhost)
    assert set(declared) == CONTRACT_QUEUES
    assert {name: facts["type"] for name, facts in declared.items()} == dict.fromkeys(CONTRACT_QUEUES, "quorum")
    assert declared[DEAD_LETTER_QUEUE]["arguments"] == {
        "x-queue-type": "quorum", "x-max-length": DEAD_LETTER_LIMIT, "x-overflow": "drop-head"}


def test_classic_is_the_default_and_declares_no_type(fresh_vhost):
    broker = Broker()
    broker.connect()
    broker.close()
    declared = queues(fresh_vhost)
    assert {name: facts["type"] for name, facts in declared.items()} == dict.fromkeys(CONTRACT_QUEUES, "classic")
    assert "x-queue-type" not in declared[REPLIES_QUEUE]["arguments"]


def test_switching_an_existing_classic_vhost_to_quorum_fails_loudly(fresh_vhost, settings):
    broker = Broker()
    broker.connect()
    broker.close()
    settings.RABBITMQ_QUEUE_TYPE = "quorum"
    with pytest.raises(BrokerUnavailable, match="PRECONDITION_FAILED"):
        Broker().connect()
    assert {facts["type"] for facts in queues(fresh_vhost).values()} == {"classic"}  # nothing was changed


def test_a_bad_queue_type_stops_the_start(monkeypatch):
    from orchestration_site.env import ConfigError, env_choice

    monkeypatch.setenv("RABBITMQ_QUEUE_TYPE", "stream")
    with pytest.raises(ConfigError, match="RABBITMQ_QUEUE_TYPE must be one of classic, quorum"):
        env_choice("RABBITMQ_QUEUE_TYPE", ("classic", "quorum"), default="classic")
