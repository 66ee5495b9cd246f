"""Prometheus metrics (docs/contract.md B3). Each process exposes its own registry: the web
process at /metrics, each consumer on a port of its own (`run_saga_consumer --metrics-port`).

The runtime calls the hooks below with its own objects; a hook costs a counter increment. The
gauges that need a query (outbox, stuck sagas, dead letters) are sampled by the consumers every
SAMPLE_SECONDS, one cheap query each, never per scrape: every consumer samples the same
database-wide values (the alert rules take their max).
"""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
import weakref

from django.conf import settings
from django.db import DatabaseError, close_old_connections
from django.http import Http404, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)

from sagas import engine
from sagas.vocabulary import ReplyFate

log = logging.getLogger(__name__)

# the *_created series would double every counter's series for a start time nobody alerts on
disable_created_metrics()

SAMPLE_SECONDS = 5.0

STARTED = Counter("saga_started_total", "Sagas started.")
FINISHED = Counter("saga_finished_total", "Sagas reaching a terminal status.", ["status"])
TRANSITIONS = Counter("saga_transitions_total", "Saga transitions, by cause.", ["cause"])
REPLIES = Counter("saga_replies_total", "Replies, by what became of them.", ["outcome"])
RESENDS = Counter("saga_resends_total", "Commands sent again.", ["kind"])
TIMEOUTS = Counter("saga_timeouts_total", "Forward steps or compensations given up on.")
REBUILDS = Counter("saga_rebuilds_total", "Saga states rebuilt from the database (Redis had lost them).")
RECONNECTS = Counter("saga_broker_reconnects_total", "RabbitMQ reconnections.", ["process"])
OUTBOX_UNSENT = Gauge("saga_outbox_unsent", "Outbox rows not yet sent.")
OUTBOX_OLDEST_AGE = Gauge("saga_outbox_oldest_unsent_age_seconds", "Age of the oldest unsent outbox row.")
STUCK = Gauge("saga_stuck", "Sagas past their step's deadline (overdue) or failed.", ["reason"])
DEAD_LETTERS = Gauge("saga_dead_letter_queue_messages",
                     "Dead letters waiting for a person: in saga.replies.dead, or filed from it and not yet settled.")
LAST_LOOP = Gauge("saga_consumer_last_loop_timestamp_seconds", "When the consumer loop last turned (Unix time).")
REPLY_TO_COMMIT = Histogram("saga_reply_to_commit_seconds", "From a reply's arrival to its transition's commit.",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
POST_TO_TERMINAL = Histogram("saga_post_to_terminal_seconds", "From POST /orders/create_order to the terminal status.",
                             buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600))

REPLY_OUTCOMES = tuple(ReplyFate)
CAUSES = ("started", "reply", "timeout", "staff")
PROCESSES = ("web", "consumer")
# every labelled series exists from the start at 0, so rate() and increase() see the first event
for _status in engine.TERMINAL:
    FINISHED.labels(_status)
for _cause in CAUSES:
    TRANSITIONS.labels(_cause)
for _outcome in REPLY_OUTCOMES:
    REPLIES.labels(_outcome)
for _kind in ("forward", "compensation"):
    RESENDS.labels(_kind)
for _reason in ("overdue", "failed"):
    STUCK.labels(_reason)

_process = "web"
_brokers_seen: weakref.WeakSet = weakref.WeakSet()
_brokers_lock = threading.Lock()


def set_process(name: str) -> None:
    """Which process this is, for saga_broker_reconnects_total (the consumer command says so)."""
    global _process
    if name not in PROCESSES:
        raise ValueError(f"process must be one of {PROCESSES}, got {name!r}")
    _process = name
    RECONNECTS.labels(name)


def transition(cause_kind: str, before: engine.SagaState | None, decision: engine.Decision) -> None:
    """A committed transition (hook: services, after the commit, once per change). `before` is
    None for a saga just started."""
    if not decision.changed:
        return
    TRANSITIONS.labels(cause_kind).inc()
    after = decision.state
    if before is None:
        STARTED.inc()
    if after.status in engine.TERMINAL and (before is None or before.status != after.status):
        FINISHED.labels(after.status).inc()
        if before is not None and before.status not in engine.TERMINAL and after.started_at is not None:
            POST_TO_TERMINAL.observe(max(0.0, time.time() - after.started_at))
    for message in decision.messages:
        if isinstance(message, engine.Command) and message.attempt > 1:
            forward = engine.flow_of(after).step_of(message.command).command == message.command
            RESENDS.labels("forward" if forward else "compensation").inc()
    if cause_kind == "timeout" and before is not None and before.awaiting is not None and not any(
            isinstance(m, engine.Command) and m.command == before.awaiting.command for m in decision.messages):
        TIMEOUTS.inc()  # the deadline passed and the awaited command was not sent again: given up on


def reply_outcome(outcome: str, *, received_at: float | None = None) -> None:
    """What became of one reply (hook: the consumer). `received_at` (the delivery's, monotonic)
    times an applied reply from its arrival to its transition's commit."""
    REPLIES.labels(outcome).inc()
    if outcome == "applied" and received_at is not None:
        REPLY_TO_COMMIT.observe(max(0.0, time.monotonic() - received_at))


def saga_rebuilt() -> None:
    REBUILDS.inc()


def broker_connected(broker) -> None:
    """A broker opened a connection (hook: sagas.broker); a second one of the same broker is a
    reconnection."""
    with _brokers_lock:
        if broker in _brokers_seen:
            RECONNECTS.labels(_process).inc()
        else:
            _brokers_seen.add(broker)


def loop_turned(now: float | None = None) -> None:
    LAST_LOOP.set(time.time() if now is None else now)


class Sampler:
    """The database-wide gauges, read at most every `every` seconds; a query that fails leaves
    the gauge as it was (and says so in the log), never the consumer's loop."""

    def __init__(self, *, every: float = SAMPLE_SECONDS):
        self.every = every
        self._next = 0.0
        self.dead_letters_in_queue = 0  # what the last filing left in saga.replies.dead (sagas.dead_letters)

    def maybe_sample(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.every
        try:
            self.sample()
        except DatabaseError as error:
            close_old_connections()
            log.warning("metrics not sampled: %r", error)
            return False
        return True

    def sample(self) -> None:
        """Four counts, each answered from an index: saga_due, saga_status_age, outbox_unsent,
        dead_letter_status."""
        from django.db.models import Count, Min
        from django.utils import timezone

        from sagas.models import DeadLetter, OutboxMessage, Saga  # after the apps are loaded

        now = timezone.now()
        outbox = OutboxMessage.objects.filter(sent_at__isnull=True).aggregate(unsent=Count("id"), oldest=Min("created_at"))
        OUTBOX_UNSENT.set(outbox["unsent"])
        OUTBOX_OLDEST_AGE.set((now - outbox["oldest"]).total_seconds() if outbox["oldest"] else 0)
        STUCK.labels("overdue").set(Saga.objects.filter(deadline__lt=now).count())
        STUCK.labels("failed").set(Saga.objects.filter(status=Saga.Status.FAILED).count())
        open_letters = DeadLetter.objects.filter(status=DeadLetter.Status.OPEN).count()
        DEAD_LETTERS.set(open_letters + self.dead_letters_in_queue)


sampler = Sampler()


def sample() -> None:
    """Hook: the consumer's tick. Samples the gauges when SAMPLE_SECONDS have passed."""
    sampler.maybe_sample()


def client_allowed(address: str | None) -> bool:
    try:
        client = ipaddress.ip_address((address or "").split("%")[0])
    except ValueError:
        return False
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:
        client = client.ipv4_mapped
    return any(client in network for network in settings.METRICS_ALLOWED_CIDRS)


def metrics_view(request):
    """This process's metrics, for the addresses of METRICS_ALLOWED_CIDRS; 404 for anyone else,
    as if there were nothing here."""
    if not client_allowed(request.META.get("REMOTE_ADDR")):
        raise Http404("Not found.")
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


def serve(*, port: int, host: str):
    """Serve this process's metrics on host:port in a daemon thread; returns the server (its
    `shutdown()` stops it)."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    log.info("serving metrics", extra={"host": host, "port": server.server_port})
    return server
