"""The Prometheus metrics: what each hook counts (driven by the real engine), /metrics behind its
allow-list, a consumer's own metrics port, and the gauges the consumers sample."""
import urllib.request
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orchestration_site.env import ConfigError, env_networks
from sagas import engine, metrics, services
from sagas.dead_letter_models import DeadLetter
from sagas.engine import Limits, Reply
from sagas.flows import ORDER_FLOW
from sagas.models import OutboxMessage, Saga
from tests.conftest import ORDER, finished, wait_for

LIMITS = Limits(step_timeout=1.0, step_max_attempts=2, compensation_max_attempts=2)
FACTS = {"user_id": "u1", "items": ORDER["items"], "currency": "EUR", "payment_method": None}
DATA = {"stock.reduce": {"total": "19.98"}, "order.create": {"order_id": "o-1"}}


def value(metric, *labels) -> float:
    return (metric.labels(*labels) if labels else metric)._value.get()


def counts() -> dict:
    return {
        "started": value(metrics.STARTED), "timeouts": value(metrics.TIMEOUTS),
        **{f"finished:{s}": value(metrics.FINISHED, s) for s in engine.TERMINAL},
        **{f"cause:{c}": value(metrics.TRANSITIONS, c) for c in metrics.CAUSES},
        **{f"resend:{k}": value(metrics.RESENDS, k) for k in ("forward", "compensation")},
    }


def delta(before: dict) -> dict:
    after = counts()
    return {key: after[key] - before[key] for key in after if after[key] != before[key]}


events = st.lists(st.sampled_from(["success", "failure", "timeout", "stale"]), max_size=12)


@pytest.mark.django_db  # a finished saga's start time is read from its row (none here: nothing observed)
@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=events)
def test_the_counters_agree_with_what_the_engine_decided(events):
    """Any run of a saga through the real engine: each transition counts once by its cause; a
    saga that reaches a terminal status counts once per new terminal status; every send with
    attempt > 1 is a resend of its kind; a deadline counts as a timeout exactly when the awaited
    command was not sent again."""
    before_counts, now = counts(), 0.0
    decision = engine.start(ORDER_FLOW, saga_id=str(uuid.uuid4()), facts=FACTS, limits=LIMITS, now=now)
    metrics.transition("started", None, decision)
    expected = {"started": 1, "cause:started": 1}

    def add(key, n=1):
        expected[key] = expected.get(key, 0) + n

    for event in events:
        state = decision.state
        if event == "timeout":
            now = state.awaiting.deadline if state.awaiting else now + 1
            cause = "timeout"
            decision = engine.on_timeout(ORDER_FLOW, state, limits=LIMITS, now=now)
        else:
            awaited = state.awaiting
            if awaited is None:
                continue
            attempt = awaited.attempt + (1 if event == "stale" else 0)
            status = "failure" if event == "failure" else "success"
            cause = "reply"
            decision = engine.on_reply(ORDER_FLOW, state, Reply(awaited.command, attempt, status, None,
                                                    DATA.get(awaited.command, {}) if status == "success" else {}),
                                       limits=LIMITS, now=now)
        metrics.transition(cause, state, decision)
        if not decision.changed:
            continue
        add(f"cause:{cause}")
        after = decision.state
        if after.status in engine.TERMINAL and after.status != state.status:
            add(f"finished:{after.status}")
        for message in decision.messages:
            if isinstance(message, engine.Command) and message.attempt > 1:
                add("resend:forward" if message.command.endswith((".reduce", ".take", ".create")) else "resend:compensation")
        if cause == "timeout" and not any(getattr(m, "command", None) == state.awaiting.command for m in decision.messages):
            add("timeouts")
    assert delta(before_counts) == {key: n for key, n in expected.items() if n}


def test_an_ignored_decision_counts_nothing():
    decision = engine.start(ORDER_FLOW, saga_id=str(uuid.uuid4()), facts=FACTS, limits=LIMITS, now=0.0)
    before = counts()
    metrics.transition("reply", decision.state, engine.ignored(decision.state, "duplicate reply"))
    assert delta(before) == {}


def test_reply_outcomes_and_the_time_to_commit():
    before = {o: value(metrics.REPLIES, o) for o in metrics.REPLY_OUTCOMES}
    observed = metrics.REPLY_TO_COMMIT._sum.get()
    metrics.reply_outcome("applied", received_at=metrics.time.monotonic() - 0.25)
    metrics.reply_outcome("ignored")
    assert {o: value(metrics.REPLIES, o) - before[o] for o in metrics.REPLY_OUTCOMES} == {
        "applied": 1, "ignored": 1, "dead_lettered": 0}
    assert metrics.REPLY_TO_COMMIT._sum.get() - observed >= 0.25


def test_a_second_connection_of_the_same_broker_is_a_reconnection():
    class Broker:
        pass

    first, again = Broker(), Broker()
    before = value(metrics.RECONNECTS, "web")
    metrics.broker_connected(first)
    metrics.broker_connected(again)
    assert value(metrics.RECONNECTS, "web") == before
    metrics.broker_connected(first)
    assert value(metrics.RECONNECTS, "web") == before + 1


@pytest.mark.django_db(transaction=True)
def test_a_saga_through_the_whole_service_feeds_the_counters_and_histograms(saga_stack):
    started, applied = value(metrics.STARTED), value(metrics.REPLIES, "applied")
    post_samples = _count(metrics.POST_TO_TERMINAL)
    commit_samples = _count(metrics.REPLY_TO_COMMIT)
    saga_id = saga_stack.create_order().json()["saga_id"]
    assert finished(saga_id).status == "completed"
    assert value(metrics.STARTED) == started + 1
    # the consumer counts a reply once its round is committed, a moment after the database says so
    wait_for(lambda: value(metrics.REPLIES, "applied") >= applied + 3, timeout=10, what="three replies counted")
    assert value(metrics.REPLIES, "applied") == applied + 3
    assert _count(metrics.POST_TO_TERMINAL) == post_samples + 1
    assert _count(metrics.REPLY_TO_COMMIT) == commit_samples + 3


def _count(histogram) -> float:
    (metric,) = histogram.collect()
    return next(sample.value for sample in metric.samples if sample.name.endswith("_count"))


# /metrics in the web process

def test_metrics_answer_an_allowed_address(client):
    response = client.get("/metrics", REMOTE_ADDR="127.0.0.1")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    for name in ("saga_started_total", "saga_broker_reconnects_total", "saga_transitions_total{cause=\"started\"}"):
        assert name in text


@pytest.mark.parametrize("address", ["10.1.2.3", "8.8.8.8", "::2", "not-an-address", ""])
def test_metrics_are_not_found_from_other_addresses(client, address):
    response = client.get("/metrics", REMOTE_ADDR=address)
    assert response.status_code == 404 and response.json() == {"detail": "Not found."}


def test_the_allow_list_is_configurable(client, settings):
    settings.METRICS_ALLOWED_CIDRS = env_networks("UNSET_VARIABLE_FOR_TEST", "10.0.0.0/8")
    assert client.get("/metrics", REMOTE_ADDR="10.9.8.7").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 404
    assert metrics.client_allowed("::ffff:10.1.1.1")  # an IPv4 client on a dual-stack socket


def test_a_bad_allow_list_stops_the_start_naming_the_variable(monkeypatch):
    monkeypatch.setenv("METRICS_ALLOWED_CIDRS", "10.0.0.0/8,everyone")
    with pytest.raises(ConfigError, match="METRICS_ALLOWED_CIDRS.*'everyone'"):
        env_networks("METRICS_ALLOWED_CIDRS", "127.0.0.1/32")


def test_a_consumer_serves_its_metrics_on_its_own_port():
    server = metrics.serve(port=0, host="127.0.0.1")
    try:
        metrics.loop_turned(1234.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert "saga_consumer_last_loop_timestamp_seconds 1234.5" in text


# the sampled gauges

@pytest.mark.django_db
def test_the_sampler_reads_outbox_stuck_sagas_and_open_dead_letters():
    saga, _ = services.start_order_saga(user_id="u1", items=ORDER["items"], currency="EUR", payment_method=None)
    failed, _ = services.start_order_saga(user_id="u2", items=ORDER["items"], currency="EUR", payment_method=None)
    now = timezone.now()
    Saga.objects.filter(pk=saga.pk).update(deadline=now - timedelta(minutes=5))
    Saga.objects.filter(pk=failed.pk).update(status=Saga.Status.FAILED, deadline=None)
    OutboxMessage.objects.update(sent_at=now)
    OutboxMessage.objects.filter(saga=saga).update(sent_at=None, created_at=now - timedelta(seconds=90))
    DeadLetter.objects.create(body=b"x", body_sha256="0" * 64, dead_lettered_at=now)
    DeadLetter.objects.create(body=b"y", body_sha256="1" * 64, dead_lettered_at=now, status=DeadLetter.Status.DISCARDED)
    sampler = metrics.Sampler(every=60)
    sampler.dead_letters_in_queue = 2
    assert sampler.maybe_sample() and not sampler.maybe_sample()  # at most once per `every`
    assert value(metrics.OUTBOX_UNSENT) == 1 and 90 <= value(metrics.OUTBOX_OLDEST_AGE) < 120
    assert (value(metrics.STUCK, "overdue"), value(metrics.STUCK, "failed")) == (1, 1)
    assert value(metrics.DEAD_LETTERS) == 3
