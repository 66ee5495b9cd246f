"""No saga lost, no effect doubled: a short fault run against the real service.

Web, two consumers and the demo participants run as real processes; about 150 orders go in over
HTTP while a seeded schedule kills a consumer and the web process, restarts RabbitMQ and
PostgreSQL, flushes Redis, and publishes poison replies. Then every service is healed, the sagas
drain, and the checker's table must be all zeros. The run has its own database, Redis db and
vhost. Its speed is not asserted (that is lab/fault_run.py's job). The consume-loop tests at
the end pin down two bugs the fault run found in sagas.broker.

    .venv/bin/python -m pytest tests/test_faults.py -m faults -s       # FAULT_SEED=<n> to repeat a run
"""
import os
import shutil
import threading
import time

import pytest

from lab.faults.runner import ScenarioConfig, run_scenario
from lab.faults.schedule import FAULT_KINDS
from sagas.broker import Broker
from tests.conftest import wait_for

pytestmark = [pytest.mark.faults]

NEEDS = ("rabbitmqctl", "pg_ctlcluster", "redis-cli")


@pytest.fixture
def fresh_connections_afterwards():
    """PostgreSQL is restarted during the run: drop this process's connections afterwards, so the
    tests that run after this one in the same session connect again instead of using dead ones."""
    yield
    from django.db import connections

    connections.close_all()


@pytest.fixture
def short_schedule(tmp_path, fresh_connections_afterwards):
    missing = [tool for tool in NEEDS if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"the fault suite restarts the machine's services; needs root and {', '.join(NEEDS)}")
    seed = int(os.environ.get("FAULT_SEED", "20240611"))
    return ScenarioConfig(sagas=150, faults=len(FAULT_KINDS), consumers=2, seed=seed, duration=40.0, poison=12,
                          drain_timeout=90.0, redis_db=12, log_dir=tmp_path / "logs")


def test_no_saga_is_lost_and_no_effect_is_doubled(short_schedule):
    result = run_scenario(short_schedule, out=lambda line: print(line, flush=True))
    print(result.summary())

    report = result.report
    assert not [h for h in result.happenings if h.error], "a fault could not be injected"
    assert {h.what.split()[0] for h in result.happenings} >= set(FAULT_KINDS), "every kind of fault happened"
    assert report.row("accepted (2xx)").value > 0.9 * short_schedule.sagas, "the service refused most orders"
    assert report.row("poison injected").value == short_schedule.poison
    assert report.ok, "\n" + result.summary()
    for name in ("LOST: accepted sagas not terminal", "DUPLICATED/MISSING effects: ledger != status",
                 "Redis disagrees with the database (present ones)", "messages left in saga.replies",
                 "outbox rows not sent", "poison missing from the dead letters", "dead letters that were not poison"):
        assert report.row(name).value == 0, name


@pytest.mark.parametrize("publish_reconnects", [False, True], ids=["connection-closed", "another-connection-opened"])
def test_the_consume_loop_consumes_again_after_a_publish_lost_the_connection(private_queue, publish_reconnects):
    """Found by the fault run: a RabbitMQ restart during a deadline check made the consumer's
    publish close the shared connection; the loop then crashed (None.process_data_events), or, if
    a later publish had already reconnected, polled a connection with no consumer on it."""
    broker, outsider, stop, handled = Broker(), Broker(), threading.Event(), []
    lost = threading.Event()

    def tick():
        if handled and not lost.is_set():
            lost.set()
            broker.close()  # what Broker.publish does when the broker went away mid-publish
            if publish_reconnects:  # the next publish of the same tick finds the broker back
                broker.publish(exchange="", routing_key=private_queue, body=b'"after"')

    thread = threading.Thread(target=broker.consume, args=(private_queue, lambda d: handled.append(d.body)),
                              kwargs={"prefetch": 10, "should_stop": stop.is_set, "tick": tick}, daemon=True)
    thread.start()
    try:
        outsider.publish(exchange="", routing_key=private_queue, body=b'"before"')
        wait_for(lambda: lost.is_set(), timeout=10, what="the first message")
        if not publish_reconnects:
            outsider.publish(exchange="", routing_key=private_queue, body=b'"after"')
        wait_for(lambda: b'"after"' in handled, timeout=10, what="the consumer to consume again")
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(timeout=10)
        outsider.close()


def test_a_backlog_does_not_starve_the_outbox_relay(private_queue):
    """Found by the fault run: pika dispatches deliveries for as long as the queue has some, so
    with a backlog of replies the consumer's tick did not run until the queue was empty, and the
    outbox relay with it: unsent rows (commands the web process could not publish) waited tens of
    seconds. `busy_tick` (the consumer's relay) now runs during a backlog; the deadline check
    still waits for the backlog (running it then caused a storm of resends)."""
    backlog = 600
    publisher = Broker()
    for _ in range(backlog):
        publisher.publish(exchange="", routing_key=private_queue, body=b"{}")
    publisher.close()
    broker, handled, busy_ticks = Broker(), [], []

    def handle(delivery):
        handled.append(delivery)
        threading.Event().wait(0.003)  # a reply takes a few milliseconds to apply

    started = time.monotonic()
    broker.consume(private_queue, handle, prefetch=50, should_stop=lambda: len(handled) >= backlog,
                   busy_tick=lambda: busy_ticks.append(time.monotonic()), tick_seconds=0.2)
    broker.close()
    gaps = [later - earlier for earlier, later in zip([started, *busy_ticks], busy_ticks)]
    assert len(handled) == backlog
    assert time.monotonic() - started > 1.5 and gaps and max(gaps) < 1.0, f"{len(busy_ticks)} busy ticks"
