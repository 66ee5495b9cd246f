"""The consumer process: competing consumers, clean stop on SIGTERM, and the outbox when the
broker or the database is away."""
import collections
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import requests

from sagas import messaging
from sagas.consumer import SagaConsumer
from sagas.models import OutboxMessage, Saga, TimelineEntry
from tests.conftest import ORDER, database_url, finished, in_thread, wait_for
from tools.stack import ROOT, Stack, free_port

pytestmark = [pytest.mark.integration]


def test_competing_consumers_apply_each_transition_once(saga_stack, settings):
    settings.SAGA_STEP_TIMEOUT_SECONDS = 1.0  # sku-silent-once makes deadlines pass: all consumers look at once
    extra = [SagaConsumer(messaging.Broker(), deadline_check_seconds=0.05) for _ in range(2)]
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
    assert saga.steps.get(name="reduce_stock").attempts == 1  # the consumer's relay sent it
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
