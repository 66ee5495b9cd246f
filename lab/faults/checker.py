"""After a run: did every accepted saga finish, did every effect happen exactly as its saga's
status says (and never twice), did the participants receive exactly the commands the timeline
says were sent, do Redis and the database agree, is nothing left in flight, and does the
dead-letter queue hold exactly the poison that was sent?

Outcomes the service may reach only because of a fault must be explained by one in the schedule,
at the time: a `failed` saga by a participant made to refuse that compensation, an order that
should have completed but was compensated by timeouts by a fault that delays replies.

Reads the database with plain SQL (psycopg), Redis with redis-py, the participants' ledger
file, and the broker, so it needs nothing of the service's own code but the ledger reader and
the queue names.

Redis rule: the database is the record; Redis is the live copy. A flush legitimately empties
Redis, and a saga that was never read again afterwards (most finished ones) stays absent. So a
saga missing from Redis agrees; a saga present in Redis must have the database's version and
status. The table says how many were present.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

import psycopg

from demo.participants import read_evidence
from lab.faults import infra
from lab.faults.orders import FORBIDDEN, SHOULD_COMPLETE, Order
from lab.faults.schedule import DELAYS_REPLIES, REFUSES_COMPENSATIONS
from lab.sandbox import redis_client
from sagas import live_state
from sagas.broker import DEAD_LETTER_QUEUE, PARTICIPANT_QUEUES, REPLIES_QUEUE
from sagas.engine import GAVE_UP, timed_out_reason
from sagas.flows import ORDER_FLOW

TERMINAL = ("completed", "compensated", "failed")
EVENTS_QUEUE = "faults.events"  # bound to saga.events by the runner, as a related service would
ZERO = {"stock_net": 0, "paid_net": Decimal("0"), "orders_open": 0}
NET_OF_STEP = {"reduce_stock": "stock_net", "take_payment": "paid_net", "create_order": "orders_open"}
TIMED_OUT = {timed_out_reason(step.name) for step in ORDER_FLOW.steps}
# how long a fault's effects may outlast it (the backlog it left behind drains meanwhile)
AFTERMATH_SECONDS = 15.0


@dataclass(frozen=True)
class FaultWindow:
    """A fault as it happened, in epoch seconds (`end`: when it was over)."""

    kind: str
    target: str | None
    start: float
    end: float

    def overlaps(self, saga: "SagaRow") -> bool:
        return self.start <= saga.updated_at and saga.created_at <= self.end + AFTERMATH_SECONDS


@dataclass
class Row:
    name: str
    value: object
    expected: object = None  # None: for information only

    @property
    def ok(self) -> bool:
        return self.expected is None or self.value == self.expected


@dataclass
class CheckReport:
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # what went wrong, saga by saga
    notes: list[str] = field(default_factory=list)  # reported, not wrong (failed sagas, outcome mix)

    def add(self, name: str, value, expected=None) -> None:
        self.rows.append(Row(name, value, expected))

    def row(self, name: str) -> Row:
        return next(row for row in self.rows if row.name == name)

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def failures(self) -> list[Row]:
        return [row for row in self.rows if not row.ok]

    def table(self) -> str:
        width = max(len(row.name) for row in self.rows)
        lines = [f"{'check':<{width}}  {'value':>9}  {'expected':>8}  ", "-" * (width + 26)]
        for row in self.rows:
            expected = "" if row.expected is None else str(row.expected)
            verdict = "" if row.expected is None else ("ok" if row.ok else "FAIL")
            lines.append(f"{row.name:<{width}}  {str(row.value):>9}  {expected:>8}  {verdict}")
        return "\n".join(lines)


@dataclass(frozen=True)
class SagaRow:
    saga_id: str
    status: str
    version: int
    total: Decimal | None
    items: list
    idempotency_key: str | None
    failure_reason: str | None
    created_at: float
    updated_at: float


def read_sagas(database_url: str) -> dict[str, SagaRow]:
    with psycopg.connect(database_url) as connection:
        rows = connection.execute(
            "SELECT id, status, version, total, items, idempotency_key, failure_reason, created_at, updated_at"
            " FROM sagas_saga").fetchall()
    return {str(r[0]): SagaRow(str(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], r[7].timestamp(), r[8].timestamp())
            for r in rows}


def unsent_outbox(database_url: str) -> int:
    with psycopg.connect(database_url) as connection:
        return connection.execute("SELECT count(*) FROM sagas_outboxmessage WHERE sent_at IS NULL").fetchone()[0]


def unfinished(database_url: str) -> int:
    with psycopg.connect(database_url) as connection:
        return connection.execute("SELECT count(*) FROM sagas_saga WHERE status <> ALL(%s)", (list(TERMINAL),)
                                  ).fetchone()[0]


def filed_dead_letters(database_url: str) -> list[infra.RawMessage]:
    """The dead letters consumers have moved from the queue into the console's table."""
    with psycopg.connect(database_url) as connection:
        rows = connection.execute("SELECT message_id, correlation_id, headers, body FROM sagas_deadletter").fetchall()
    return [infra.RawMessage(message_id or None, correlation_id or None, headers or {}, bytes(body))
            for message_id, correlation_id, headers, body in rows]


def sent_commands(database_url: str) -> Counter:
    """(saga_id, command, attempt) -> how often the timeline says it was sent."""
    with psycopg.connect(database_url) as connection:
        rows = connection.execute(
            "SELECT saga_id, command, attempt, count(*) FROM sagas_timelineentry WHERE kind = 'command'"
            " GROUP BY saga_id, command, attempt").fetchall()
    return Counter({(str(saga_id), command, attempt): count for saga_id, command, attempt, count in rows})


def redis_states(redis_db: int, saga_ids: list[str]) -> dict[str, tuple[int, str]]:
    """saga_id -> (version, status) for the sagas Redis holds."""
    client = redis_client(redis_db)
    pipe = client.pipeline(transaction=False)
    for saga_id in saga_ids:
        pipe.hmget(live_state.key(saga_id), "version", "state")  # the runtime's own key
    present = {}
    for saga_id, (version, state) in zip(saga_ids, pipe.execute()):
        if version is not None or state is not None:
            status = json.loads(state)["status"] if state else None
            present[saga_id] = (int(version) if version is not None else None, status)
    return present


def check(*, orders: list[Order], sagas: dict[str, SagaRow], database_url: str, redis_db: int, ledger_path,
          vhost: str, poison_ids: list[str], died_on_their_own: list[str], faults: list[FaultWindow]) -> CheckReport:
    """Everything is stopped when this runs: no process changes what it reads. `sagas` is
    `read_sagas(database_url)`, read by the caller after everything stopped; `faults` is what the
    schedule did, and when."""
    report = CheckReport()
    accepted = [order for order in orders if order.accepted]
    by_saga = {order.saga_id: order for order in accepted}
    by_key = {order.key: order for order in orders}

    report.add("orders sent", len(orders))
    report.add("accepted (2xx)", len(accepted))
    refused = Counter(str(order.status_code or next(iter(order.problems), "no answer")) for order in orders if not order.accepted)
    report.add("not accepted (client gave up / refused)", len(orders) - len(accepted))
    for why, count in sorted(refused.items()):
        report.notes.append(f"not accepted: {count} x last answer {why}")
    unknown_accepted = [o for o in accepted if o.saga_id not in sagas]
    report.add("accepted but not in the database", len(unknown_accepted), 0)
    started_unacknowledged = [s for s in sagas.values() if s.saga_id not in by_saga]
    report.add("sagas in the database", len(sagas))
    report.add("  of which never acknowledged with a 2xx", len(started_unacknowledged))

    # lost: accepted and not finished (any saga in the database is checked too)
    lost = [o for o in accepted if o.saga_id in sagas and sagas[o.saga_id].status not in TERMINAL]
    report.add("LOST: accepted sagas not terminal", len(lost), 0)
    stuck = [s for s in sagas.values() if s.status not in TERMINAL]
    report.add("sagas in the database not terminal", len(stuck), 0)
    for saga in stuck:
        report.details.append(f"not terminal: {saga.saga_id} {saga.status} v{saga.version}")
    statuses = Counter(s.status for s in sagas.values())
    for status in TERMINAL:
        report.add(f"  {status}", statuses.get(status, 0))

    # effects: the ledger must say exactly what the status says, and nothing may happen twice
    evidence = read_evidence(ledger_path)
    ledger = evidence.summary
    mismatches = []
    for saga in sagas.values():
        effects = ledger.get(saga.saga_id, ZERO)
        if saga.status == "completed":
            quantity = sum(item["quantity"] for item in saga.items)
            expected = {"stock_net": quantity, "paid_net": saga.total, "orders_open": 1}
        elif saga.status == "compensated":
            expected = ZERO
        else:
            continue
        if effects != expected:
            mismatches.append(saga.saga_id)
            report.details.append(f"ledger mismatch: {saga.saga_id} {saga.status} ({saga.failure_reason}):"
                                  f" ledger {_fmt(effects)}, expected {_fmt(expected)}")
    report.add("DUPLICATED/MISSING effects: ledger != status", len(mismatches), 0)
    doubled = doubled_effects(evidence.effects)
    report.add("effects applied twice (e.g. a payment taken twice)", len(doubled), 0)
    report.details.extend(f"applied {count} times: {saga_id} {participant} {effect}{' ' + product if product else ''}"
                          for (saga_id, participant, effect, product), count in doubled.items())
    strangers = sorted(set(ledger) - set(sagas))
    report.add("ledger effects for sagas not in the database", len(strangers), 0)

    _check_failed(report, sagas, ledger, faults)
    _check_commands(report, sent_commands(database_url), evidence.received)

    wrong = []
    for saga in sagas.values():
        order = by_saga.get(saga.saga_id) or by_key.get(saga.idempotency_key)
        if order is None:
            continue
        if saga.status in FORBIDDEN.get(order.kind, ()):
            wrong.append(f"{order.kind} order {saga.saga_id} ended {saga.status}")
        elif saga.status == "completed" and saga.total != order.expected_total:
            wrong.append(f"{order.kind} order {saga.saga_id} completed with total {saga.total},"
                         f" catalogue says {order.expected_total}")
    report.add("impossible outcomes (e.g. declined card completed)", len(wrong), 0)
    report.details.extend(wrong)
    timed_out = []
    for saga in sagas.values():
        order = by_saga.get(saga.saga_id) or by_key.get(saga.idempotency_key)
        if (order is not None and order.kind in SHOULD_COMPLETE and saga.status == "compensated"
                and saga.failure_reason in TIMED_OUT
                and not any(f.kind in DELAYS_REPLIES and f.overlaps(saga) for f in faults)):
            timed_out.append(f"{order.kind} order {saga.saga_id} compensated ({saga.failure_reason})"
                             " with no fault that delays replies scheduled during its life")
    report.add("should-complete orders compensated by timeouts no fault explains", len(timed_out), 0)
    report.details.extend(timed_out)
    outcome_mix = defaultdict(Counter)
    for order in accepted:
        if order.saga_id in sagas:
            outcome_mix[order.kind][sagas[order.saga_id].status] += 1
    for kind, counts in sorted(outcome_mix.items()):
        report.notes.append(f"outcomes of {kind}: " + ", ".join(f"{s} {n}" for s, n in sorted(counts.items())))

    # Redis against the database
    present = redis_states(redis_db, list(sagas))
    disagree = [(saga_id, state, sagas[saga_id]) for saga_id, state in present.items()
                if state != (sagas[saga_id].version, sagas[saga_id].status)]
    report.add("sagas present in Redis", len(present))
    report.add("Redis disagrees with the database (present ones)", len(disagree), 0)
    for saga_id, (version, status), saga in disagree:
        report.details.append(f"redis {saga_id}: v{version} {status}, database v{saga.version} {saga.status}")

    # nothing in flight
    depths = infra.queue_totals(vhost)
    report.add(f"messages left in {REPLIES_QUEUE}", depths.get(REPLIES_QUEUE, 0), 0)
    report.add("commands left in participant queues", sum(depths.get(q, 0) for q in PARTICIPANT_QUEUES), 0)
    report.add("outbox rows not sent", unsent_outbox(database_url), 0)

    # events: every finished saga told the related services its final status (at least once)
    told = defaultdict(list)
    for message in infra.take_all(vhost, EVENTS_QUEUE):
        body = json.loads(message.body)
        told[body["saga_id"]].append(body["status"])
    finished = [s for s in sagas.values() if s.status in TERMINAL]
    untold = [s for s in finished if s.status not in told.get(s.saga_id, [])]
    report.add("finished sagas without their saga.<status> event", len(untold), 0)
    wrong_events = [(saga_id, statuses) for saga_id, statuses in told.items()
                    if saga_id not in sagas or any(status != sagas[saga_id].status for status in statuses)]
    report.add("events that contradict the saga's status", len(wrong_events), 0)
    report.add("  events published more than once (at-least-once)", sum(len(v) - 1 for v in told.values()))
    report.details.extend(f"no event for {s.saga_id} ({s.status})" for s in untold)
    report.details.extend(f"events {statuses} for {saga_id} ({sagas[saga_id].status if saga_id in sagas else 'unknown'})"
                          for saga_id, statuses in wrong_events)

    # dead letters: exactly the poison, whether still in the queue or filed for the console
    dead = infra.take_all(vhost, DEAD_LETTER_QUEUE) + filed_dead_letters(database_url)
    seen = Counter(message.message_id for message in dead)
    injected = set(poison_ids)
    report.add("poison injected", len(poison_ids))
    report.add("dead letters", len(dead), len(poison_ids))
    missing = sorted(injected - set(seen))
    report.add("poison missing from the dead letters", len(missing), 0)
    unexpected = [m for m in dead if m.message_id not in injected]
    report.add("dead letters that were not poison", len(unexpected), 0)
    duplicates = sum(count - 1 for message_id, count in seen.items() if message_id in injected and count > 1)
    report.add("poison dead-lettered twice", duplicates, 0)
    for message_id in missing:
        report.details.append(f"poison not dead-lettered: {message_id}")
    for message in unexpected:
        report.details.append(f"unexpected dead letter {message.message_id} ({message.headers.get('x-dead-letter-reason')}):"
                              f" {message.body[:200]!r}")

    report.add("processes that died on their own", len(died_on_their_own), 0)
    report.details.extend(f"died on its own: {name}" for name in died_on_their_own)
    return report


def doubled_effects(effects: list[dict]) -> dict[tuple, int]:
    """Effects recorded more than once for one saga (per product, for stock): each participant
    applies an action and its undo at most once per saga, whatever the repeats and redeliveries."""
    counts = Counter((e["saga_id"], e["participant"], e["effect"], e["product_id"]) for e in effects)
    return {key: count for key, count in counts.items() if count > 1}


def _check_failed(report: CheckReport, sagas: dict[str, SagaRow], ledger: dict, faults: list[FaultWindow]) -> None:
    """A `failed` saga is a failure of the run unless a participant the schedule made refuse
    compensations refused the one it gave up on, while the saga ran. Either way, the steps
    compensated before the one given up on must be undone in the ledger."""
    unexplained, unundone = [], []
    for saga in (s for s in sagas.values() if s.status == "failed"):
        effects = ledger.get(saga.saga_id, ZERO)
        report.notes.append(f"FAILED saga {saga.saga_id}: {saga.failure_reason}; ledger {_fmt(effects)}")
        compensation, gave_up, _ = (saga.failure_reason or "").partition(GAVE_UP)
        step = ORDER_FLOW.step_of(compensation) if gave_up else None
        participant = compensation.split(".", 1)[0]
        if step is None or not any(f.kind in REFUSES_COMPENSATIONS and f.target == participant and f.overlaps(saga)
                                   for f in faults):
            unexplained.append(saga.saga_id)
            report.details.append(f"failed saga the schedule did not cause: {saga.saga_id} ({saga.failure_reason})")
        if step is None:
            continue
        position = ORDER_FLOW.steps.index(step)
        left = [s.name for s in ORDER_FLOW.steps[position + 1:] if effects[NET_OF_STEP[s.name]] != ZERO[NET_OF_STEP[s.name]]]
        if left:
            unundone.append(saga.saga_id)
            report.details.append(f"failed saga {saga.saga_id} gave up at {compensation} but {', '.join(left)}"
                                  f" (compensated before it) is not undone: ledger {_fmt(effects)}")
    report.add("FAILED sagas the schedule did not cause", len(unexplained), 0)
    report.add("failed sagas with an effect left that was compensated before", len(unundone), 0)


def _check_commands(report: CheckReport, sent: Counter, received: dict[tuple[str, str, int], int]) -> None:
    """Per (saga, command, attempt): every command the timeline shows sent arrived at least as
    often, and nothing arrived that it does not show. More arrivals than sends is at-least-once
    delivery (a redelivery, or a row the outbox relay sent again), reported only."""
    report.add("commands sent (timeline)", sum(sent.values()))
    report.add("commands received (participants)", sum(received.values()))
    strangers = sorted(key for key in received if key not in sent)
    report.add("commands received that the timeline does not show", len(strangers), 0)
    lost = sorted(key for key, count in sent.items() if received.get(key, 0) < count)
    report.add("commands sent that no participant received", len(lost), 0)
    report.add("  commands received more often than sent (at-least-once)",
               sum(count - sent[key] for key, count in received.items() if key in sent and count > sent[key]))
    report.details.extend(f"received, not in the timeline: {saga_id} {command} #{attempt}"
                          for saga_id, command, attempt in strangers)
    report.details.extend(f"sent {sent[(saga_id, command, attempt)]}x, received {received.get((saga_id, command, attempt), 0)}x:"
                          f" {saga_id} {command} #{attempt}" for saga_id, command, attempt in lost)


def _fmt(effects: dict) -> str:
    return f"stock {effects['stock_net']} paid {effects['paid_net']} orders {effects['orders_open']}"
