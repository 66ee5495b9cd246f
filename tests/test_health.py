"""Readiness of the web process (/readyz) and the consumer's heartbeat and liveness probe, on the
real database, Redis and RabbitMQ."""
import time

import pytest
from django.core.management import call_command

from sagas import health
from sagas.broker import Broker
from sagas.consumer import SagaConsumer
from sagas.runtime import Runtime
from tests.conftest import in_thread, wait_for


def test_liveness_stays_the_seeds_answer(client):
    assert client.get("/").json() == {"status": "ok", "service": "order-orchestrator"}


@pytest.mark.django_db(transaction=True)
def test_ready_when_the_database_redis_and_the_broker_answer(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "redis": "ok", "broker": "ok"}}


@pytest.mark.django_db(transaction=True)
def test_not_ready_names_the_broker_when_it_cannot_be_reached(client, settings):
    settings.RABBITMQ = {**settings.RABBITMQ, "port": 1}  # nothing listens there
    response = client.get("/readyz")
    assert response.status_code == 503 and response["Content-Type"] == "application/json"
    body = response.json()
    assert body["detail"] == "not ready: broker"
    assert body["checks"]["database"] == body["checks"]["redis"] == "ok"
    assert body["checks"]["broker"].startswith("failed")


@pytest.mark.django_db(transaction=True)
def test_a_broker_that_does_not_answer_fails_within_the_deadline(client, settings, stalling_proxy):
    stalling_proxy.stall()
    settings.READINESS_TIMEOUT_SECONDS = 0.5
    started = time.monotonic()
    response = client.get("/readyz")
    assert time.monotonic() - started < 2.0
    assert response.status_code == 503
    assert response.json()["checks"]["broker"] == "no answer within 0.5s"


def test_readyz_answers_other_methods_405(client):
    assert client.post("/readyz").status_code in (403, 405)  # 403: the CSRF check comes first
    assert client.generic("PUT", "/readyz").status_code in (403, 405)


# the consumer's heartbeat

def beat_file(tmp_path):
    return tmp_path / "consumer.heartbeat"


def test_a_fresh_heartbeat_file_is_healthy_and_an_old_one_is_not(tmp_path):
    heartbeat = health.Heartbeat(name="c1", path=str(beat_file(tmp_path)), use_redis=False)
    heartbeat.beat(now=1000.0)
    assert health.judge_heartbeat(name="c1", source="file", path=str(beat_file(tmp_path)), max_age=60, now=1030.0).healthy
    verdict = health.judge_heartbeat(name="c1", source="file", path=str(beat_file(tmp_path)), max_age=60, now=1061.0)
    assert not verdict.healthy and "61s ago" in verdict.message


def test_no_heartbeat_file_is_unhealthy(tmp_path):
    verdict = health.judge_heartbeat(name="c1", source="file", path=str(beat_file(tmp_path)), max_age=60)
    assert not verdict.healthy and "no heartbeat file" in verdict.message


def test_a_damaged_heartbeat_file_is_unhealthy(tmp_path):
    beat_file(tmp_path).write_text("yesterday")
    assert not health.judge_heartbeat(name="c1", source="file", path=str(beat_file(tmp_path)), max_age=60).healthy


def test_the_redis_heartbeat_serves_a_probe_on_another_host(fresh_redis):
    name = "consumer-on-host-b"
    health.Heartbeat(name=name, path=None).beat()
    assert health.judge_heartbeat(name=name, source="redis", path=None, max_age=5).healthy
    assert not health.judge_heartbeat(name="never-ran", source="redis", path=None, max_age=5).healthy


def test_the_probe_command_exits_0_or_1_with_one_line(tmp_path, capsys, settings):
    settings.CONSUMER_HEARTBEAT_FILE = str(beat_file(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        call_command("consumer_health")
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip().startswith("unhealthy: consumer ")
    health.Heartbeat(name="c1", path=settings.CONSUMER_HEARTBEAT_FILE, use_redis=False).beat()
    call_command("consumer_health")
    out = capsys.readouterr().out
    assert out.startswith("healthy: ") and out.count("\n") == 1


@pytest.mark.django_db(transaction=True)
def test_the_running_consumer_beats_and_the_probe_fails_once_it_stops(tmp_path, fast_deadlines, fresh_redis, fresh_queues):
    path = str(beat_file(tmp_path))
    health.install_heartbeat(health.Heartbeat(name="c-test", path=path))
    consumer = SagaConsumer(Runtime.for_consumer(Broker()), deadline_check_seconds=0.1)
    thread = in_thread(consumer.run, "saga-consumer")
    try:
        wait_for(lambda: health.judge_heartbeat(name="c-test", source="file", path=path, max_age=1).healthy,
                 timeout=10, what="a heartbeat")
        first = float(beat_file(tmp_path).read_text())
        wait_for(lambda: float(beat_file(tmp_path).read_text()) > first, timeout=5, what="a second beat")
    finally:
        consumer.stop()
        thread.join(timeout=10)
        health.install_heartbeat(None)
    assert not thread.is_alive()
    wait_for(lambda: not health.judge_heartbeat(name="c-test", source="file", path=path, max_age=1).healthy,
             timeout=5, what="the probe to fail")


@pytest.mark.django_db(transaction=True)
def test_a_burst_of_readiness_requests_asks_the_dependencies_once(client, settings, monkeypatch):
    settings.READINESS_CACHE_SECONDS = 30.0
    monkeypatch.setattr(health, "_last_answer", None)
    asked = []
    for name, check in list(health.CHECKS.items()):
        monkeypatch.setitem(health.CHECKS, name, lambda check=check, name=name: asked.append(name) or check())
    answers = [client.get("/readyz").status_code for _ in range(20)]
    assert answers == [200] * 20
    assert sorted(asked) == ["broker", "database", "redis"]  # once each, for twenty requests
