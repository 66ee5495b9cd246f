"""Demo Stock, Payment, Order and Shipping services that speak only the contract (section 4).

They stand in for the real services in the demo, the integration tests, the benchmark and the
fault-injection suite, so they follow the contract's rules strictly and record every effect:

- a repeated (saga_id, command) is the same request: same status, reason and data (the reply
  echoes the attempt it answers), and no second effect;
- a compensation undoes whatever its forward command applied and has not been undone yet; if
  nothing was applied it succeeds with no effect and leaves a tombstone, so the forward command
  arriving late fails with "already_compensated" and has no effect;
- a command whose envelope is broken (not JSON, no saga_id/command/attempt) is logged and dropped;
  a forward command with a valid envelope but an unusable payload fails with "invalid_payload".

The ledger also keeps, for the fault suite's checker, every command received (per saga, command
and attempt, one row per delivery), and it takes one fault: `refuse_compensations` makes a
participant answer compensations with a failure for a while.

Shipping (shipping.dispatch / shipping.recall) is the step of a four-step flow: the runtime's
topology does not know its queue, so its worker declares `shipping.commands` itself, and it runs
only when asked (`start_participants(with_shipping=True)`, `run_demo_participants --with-shipping`).
Its effects are in `Ledger.effects()` (dispatched / recalled), not in `summary()`.

State lives in one SQLite ledger file that the services share (they are separate services
that happen to keep their books in one file, so checkers can read it), written with sqlite3
directly, one connection per thread. `handle_command` is the whole behaviour without a broker;
`ParticipantWorker` carries it over RabbitMQ. See `catalogue.py` for the demo data and the
behaviour-trigger products (sku-slow, sku-silent-once, sku-dup).
"""
from __future__ import annotations

import heapq
import itertools
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path

from django.conf import settings

from demo.catalogue import (
    DECLINED_PAYMENT_METHOD,
    DUPLICATE_REPLY_PRODUCT,
    PRODUCTS,
    SILENT_ONCE_PRODUCT,
    SLOW_PRODUCT,
    SLOW_REPLY_SECONDS,
    UNORDERABLE_PRODUCT,
    Product,
)
from sagas.broker import (
    COMMANDS_EXCHANGE,
    PARTICIPANT_QUEUES,
    REPLIES_QUEUE,
    Backoff,
    Broker,
    BrokerUnavailable,
    Delivery,
    RetryLater,
    Unroutable,
    encode,
)

log = logging.getLogger(__name__)

CENT = Decimal("0.01")
PREFETCH = 50
# the demo's own participant queue -> its binding on saga.commands; declared by its worker
SHIPPING_QUEUE, SHIPPING_BINDING = "shipping.commands", "shipping.*"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    product_id TEXT PRIMARY KEY, price TEXT NOT NULL, stock INTEGER NOT NULL CHECK (stock >= 0));
-- idempotency memory: the outcome of every forward command, replayed for repeats
CREATE TABLE IF NOT EXISTS replies (
    saga_id TEXT NOT NULL, command TEXT NOT NULL, status TEXT NOT NULL, reason TEXT, data TEXT NOT NULL,
    PRIMARY KEY (saga_id, command));
-- a compensation that found nothing to undo: the forward command may no longer apply
CREATE TABLE IF NOT EXISTS tombstones (
    saga_id TEXT NOT NULL, participant TEXT NOT NULL, at TEXT NOT NULL, PRIMARY KEY (saga_id, participant));
-- commands deliberately lost once (sku-silent-once)
CREATE TABLE IF NOT EXISTS dropped (saga_id TEXT NOT NULL, command TEXT NOT NULL, PRIMARY KEY (saga_id, command));
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, saga_id TEXT NOT NULL, participant TEXT NOT NULL,
    effect TEXT NOT NULL, product_id TEXT, quantity INTEGER, amount TEXT, currency TEXT, reference TEXT);
CREATE INDEX IF NOT EXISTS ledger_by_saga ON ledger (saga_id, participant);
-- every command with a usable envelope, one row per delivery: the fault checker counts these
-- against the commands the orchestrator's timeline says it sent
CREATE TABLE IF NOT EXISTS received (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, saga_id TEXT NOT NULL, command TEXT NOT NULL,
    attempt INTEGER NOT NULL);
-- a participant told to refuse compensations until `until` (epoch seconds): a fault of the fault suite
CREATE TABLE IF NOT EXISTS refusals (participant TEXT PRIMARY KEY, until REAL NOT NULL);
"""
_TABLES = ("products", "replies", "tombstones", "dropped", "ledger", "received", "refusals")
COMPENSATION_REFUSED = "compensation_refused"


def default_ledger_path() -> Path:
    return Path(settings.BASE_DIR) / "var" / "demo_ledger.sqlite3"


class Ledger:
    """The participants' books: stock levels, effects, idempotency memory, tombstones.

    One instance per thread (sqlite3 connections are not shared). A new ledger starts with
    the given catalogue; an existing one keeps its stock.
    """

    def __init__(self, path: str | Path | None = None, *, products: Mapping[str, Product] = PRODUCTS):
        self.path = str(path or default_ledger_path())
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: every write goes through transaction(), which takes the write lock up front.
        self.db = sqlite3.connect(self.path, timeout=20, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        with self.transaction() as db:
            if db.execute("SELECT COUNT(*) FROM products").fetchone()[0] == 0:
                _insert_products(db, products)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def reset(self, *, products: Mapping[str, Product] = PRODUCTS) -> None:
        """Forget everything and start again from the catalogue."""
        with self.transaction() as db:
            for table in _TABLES:
                db.execute(f"DELETE FROM {table}")
            _insert_products(db, products)

    def stock_level(self, product_id: str) -> int | None:
        row = self.db.execute("SELECT stock FROM products WHERE product_id = ?", (product_id,)).fetchone()
        return None if row is None else row[0]

    def effects(self, saga_id: str | None = None) -> list[dict]:
        """Ledger rows in the order they happened, for one saga or all."""
        query, args = "SELECT * FROM ledger ORDER BY id", ()
        if saga_id is not None:
            query, args = "SELECT * FROM ledger WHERE saga_id = ? ORDER BY id", (saga_id,)
        cursor = self.db.execute(query, args)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def summary(self) -> dict[str, dict]:
        totals: dict[str, dict] = {}
        for saga_id, effect, quantity, amount in self.db.execute(
            "SELECT saga_id, effect, quantity, amount FROM ledger ORDER BY id"
        ):
            entry = totals.setdefault(saga_id, {"stock_net": 0, "paid_net": Decimal("0"), "orders_open": 0})
            if effect in ("stock_reduced", "stock_restored"):
                entry["stock_net"] += quantity if effect == "stock_reduced" else -quantity
            elif effect in ("charged", "refunded"):
                entry["paid_net"] += Decimal(amount) if effect == "charged" else -Decimal(amount)
            elif effect in ("order_created", "order_cancelled"):
                entry["orders_open"] += 1 if effect == "order_created" else -1
        return totals

    def received(self) -> dict[tuple[str, str, int], int]:
        """How many deliveries of each (saga_id, command, attempt) the participants took in."""
        return {(saga_id, command, attempt): count for saga_id, command, attempt, count in self.db.execute(
            "SELECT saga_id, command, attempt, COUNT(*) FROM received GROUP BY saga_id, command, attempt")}

    def refuse_compensations(self, *, participant: str, until: float) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO refusals (participant, until) VALUES (?, ?)", (participant, until))

    def close(self) -> None:
        self.db.close()


@dataclass(frozen=True)
class LedgerEvidence:
    """What the participants' books say, for a checker that compares them with the orchestrator's."""

    summary: dict[str, dict]
    effects: list[dict]
    received: dict[tuple[str, str, int], int]


def read_evidence(path: str | Path) -> LedgerEvidence:
    ledger = Ledger(path)
    try:
        return LedgerEvidence(ledger.summary(), ledger.effects(), ledger.received())
    finally:
        ledger.close()


def refuse_compensations(path: str | Path, *, participant: str, seconds: float) -> None:
    """From now on and for `seconds`, `participant` answers every compensation with a failure
    (no effect), as a service that cannot undo anything for a while. Lapses by itself."""
    ledger = Ledger(path)
    try:
        ledger.refuse_compensations(participant=participant, until=time.time() + seconds)
    finally:
        ledger.close()


def ledger_summary(path: str | Path) -> dict[str, dict]:
    """Per saga: {"stock_net": units reduced minus restored, "paid_net": Decimal, "orders_open": int}."""
    ledger = Ledger(path)
    try:
        return ledger.summary()
    finally:
        ledger.close()


def reset_ledger(path: str | Path, *, products: Mapping[str, Product] = PRODUCTS) -> None:
    ledger = Ledger(path, products=products)
    try:
        ledger.reset(products=products)
    finally:
        ledger.close()


def _insert_products(db: sqlite3.Connection, products: Mapping[str, Product]) -> None:
    db.executemany(
        "INSERT INTO products (product_id, price, stock) VALUES (?, ?, ?)",
        [(sku, str(product.price), product.stock) for sku, product in products.items()],
    )


# --- commands and outcomes -------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    saga_id: str
    name: str
    attempt: int
    payload: dict

    def log_fields(self) -> dict:
        return {"saga_id": self.saga_id, "command": self.name, "attempt": self.attempt}


@dataclass(frozen=True)
class Outcome:
    status: str
    reason: str | None = None
    data: dict = field(default_factory=dict)


def _success(**data) -> Outcome:
    return Outcome("success", None, data)


def _failure(reason: str, **data) -> Outcome:
    return Outcome("failure", reason, data)


class InvalidPayload(ValueError):
    pass


def parse_command(body: object) -> Command | None:
    """The command in a decoded message body, or None when its envelope is unusable."""
    if not isinstance(body, dict):
        return None
    saga_id, name, attempt = body.get("saga_id"), body.get("command"), body.get("attempt")
    if not (isinstance(saga_id, str) and saga_id and isinstance(name, str) and name):
        return None
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        return None
    payload = body.get("payload")
    return Command(saga_id, name, attempt, payload if isinstance(payload, dict) else {})


def reply_body(command: Command, outcome: Outcome) -> dict:
    return {
        "saga_id": command.saga_id,
        "command": command.name,
        "attempt": command.attempt,
        "status": outcome.status,
        "reason": outcome.reason,
        "data": outcome.data,
    }


# --- what each participant does ----------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _record(db: sqlite3.Connection, saga_id: str, participant: str, effect: str, **details) -> None:
    db.execute(
        "INSERT INTO ledger (at, saga_id, participant, effect, product_id, quantity, amount, currency, reference)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            _now(), saga_id, participant, effect, details.get("product_id"), details.get("quantity"),
            None if details.get("amount") is None else str(details["amount"]),
            details.get("currency"), details.get("reference"),
        ),
    )


def _quantities(payload: dict) -> dict[str, int]:
    items = payload.get("items")
    if not isinstance(items, list) or not items:
        raise InvalidPayload("items must be a non-empty list")
    wanted: dict[str, int] = {}
    for item in items:
        product_id = item.get("product_id") if isinstance(item, dict) else None
        quantity = item.get("quantity") if isinstance(item, dict) else None
        if not isinstance(product_id, str) or not product_id:
            raise InvalidPayload("every item needs a product_id string")
        if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
            raise InvalidPayload(f"quantity of {product_id} must be a positive integer")
        wanted[product_id] = wanted.get(product_id, 0) + quantity
    return wanted


def _money(payload: dict) -> tuple[Decimal, str]:
    amount, currency = payload.get("amount"), payload.get("currency")
    try:
        value = Decimal(amount) if isinstance(amount, (str, int)) and not isinstance(amount, bool) else None
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite() or value < 0:
        raise InvalidPayload("amount must be a non-negative decimal string")
    if not isinstance(currency, str) or not currency:
        raise InvalidPayload("currency must be a string")
    return value, currency


def _product_ids(payload: dict) -> set[str]:
    """Product ids named in a payload, tolerating any shape (for the behaviour triggers)."""
    items = payload.get("items")
    if not isinstance(items, list):
        return set()
    return {item["product_id"] for item in items if isinstance(item, dict) and isinstance(item.get("product_id"), str)}


def _reduce_stock(db: sqlite3.Connection, command: Command) -> Outcome:
    wanted = _quantities(command.payload)
    stock: dict[str, tuple[Decimal, int]] = {}
    for product_id in wanted:
        row = db.execute("SELECT price, stock FROM products WHERE product_id = ?", (product_id,)).fetchone()
        if row is None:
            return _failure("unknown_product", product_ids=[product_id])
        stock[product_id] = (Decimal(row[0]), row[1])
    short = [product_id for product_id, quantity in wanted.items() if stock[product_id][1] < quantity]
    if short:
        return _failure("out_of_stock", product_ids=short)
    for product_id, quantity in wanted.items():
        db.execute("UPDATE products SET stock = stock - ? WHERE product_id = ?", (quantity, product_id))
        _record(db, command.saga_id, "stock", "stock_reduced", product_id=product_id, quantity=quantity)
    total = sum((stock[product_id][0] * quantity for product_id, quantity in wanted.items()), Decimal("0"))
    return _success(total=str(total.quantize(CENT)))


def _restore_stock(db: sqlite3.Connection, saga_id: str) -> None:
    taken = db.execute(
        "SELECT product_id, quantity FROM ledger WHERE saga_id = ? AND effect = 'stock_reduced' ORDER BY id",
        (saga_id,),
    ).fetchall()
    for product_id, quantity in taken:
        db.execute("UPDATE products SET stock = stock + ? WHERE product_id = ?", (quantity, product_id))
        _record(db, saga_id, "stock", "stock_restored", product_id=product_id, quantity=quantity)


def _take_payment(db: sqlite3.Connection, command: Command) -> Outcome:
    amount, currency = _money(command.payload)
    method = command.payload.get("payment_method")
    if method is not None and not isinstance(method, str):
        raise InvalidPayload("payment_method must be a string")
    if method == DECLINED_PAYMENT_METHOD:
        return _failure("payment_declined")
    payment_id = f"pay-{uuid.uuid4().hex[:12]}"
    _record(db, command.saga_id, "payment", "charged", amount=amount, currency=currency, reference=payment_id)
    return _success(payment_id=payment_id)


def _undo_recorded_effect(participant: str, effect: str, undo: str):
    """The compensation of a payment, an order or a shipment: the same amount and reference, undone."""

    def undo_effect(db: sqlite3.Connection, saga_id: str) -> None:
        amount, currency, reference = db.execute(
            "SELECT amount, currency, reference FROM ledger WHERE saga_id = ? AND effect = ?", (saga_id, effect)
        ).fetchone()
        _record(db, saga_id, participant, undo, amount=amount, currency=currency, reference=reference)

    return undo_effect


_refund_payment = _undo_recorded_effect("payment", "charged", "refunded")


def _create_order(db: sqlite3.Connection, command: Command) -> Outcome:
    amount, currency = _money(command.payload)
    if UNORDERABLE_PRODUCT in _product_ids(command.payload):
        return _failure("order_rejected")
    order_id = f"o-{uuid.uuid4().hex[:12]}"
    _record(db, command.saga_id, "order", "order_created", amount=amount, currency=currency, reference=order_id)
    return _success(order_id=order_id)


_cancel_order = _undo_recorded_effect("order", "order_created", "order_cancelled")


def _dispatch_shipment(db: sqlite3.Connection, command: Command) -> Outcome:
    order_id = command.payload.get("order_id")
    if not isinstance(order_id, str) or not order_id:
        raise InvalidPayload("order_id must be a non-empty string")
    _quantities(command.payload)  # what is shipped: a usable list of items
    shipment_id = f"sh-{uuid.uuid4().hex[:12]}"
    _record(db, command.saga_id, "shipping", "dispatched", reference=shipment_id)
    return _success(shipment_id=shipment_id)


_recall_shipment = _undo_recorded_effect("shipping", "dispatched", "recalled")


@dataclass(frozen=True)
class ParticipantRules:
    name: str
    forward: str
    compensation: str
    applied_effect: str
    undone_effect: str
    apply: Callable[[sqlite3.Connection, Command], Outcome]
    undo: Callable[[sqlite3.Connection, str], None]


RULES = (
    ParticipantRules(
        "stock", "stock.reduce", "stock.restore", "stock_reduced", "stock_restored", _reduce_stock, _restore_stock
    ),
    ParticipantRules(
        "payment", "payment.take", "payment.refund", "charged", "refunded", _take_payment, _refund_payment
    ),
    ParticipantRules(
        "order", "order.create", "order.cancel", "order_created", "order_cancelled", _create_order, _cancel_order
    ),
    ParticipantRules(
        "shipping", "shipping.dispatch", "shipping.recall", "dispatched", "recalled", _dispatch_shipment,
        _recall_shipment,
    ),
)
RULES_BY_COMMAND = {name: rules for rules in RULES for name in (rules.forward, rules.compensation)}


def handle_command(ledger: Ledger, body: object) -> dict | None:
    """The reply body for one decoded command body, or None when no reply is sent.

    No reply for a broken envelope, an unknown command, or a stock.reduce that sku-silent-once
    loses. The receipt, the decision and its effects are one ledger transaction.
    """
    command = parse_command(body)
    if command is None:
        log.warning("malformed command dropped", extra={"body": repr(body)[:200]})
        return None
    rules = RULES_BY_COMMAND.get(command.name)
    with ledger.transaction() as db:
        # counted even when dropped: the checker compares what arrived with what was sent
        db.execute("INSERT INTO received (at, saga_id, command, attempt) VALUES (?, ?, ?, ?)",
                   (_now(), command.saga_id, command.name, command.attempt))
        if rules is None:
            log.warning("unknown command dropped", extra=command.log_fields())
            return None
        if command.name == rules.forward:
            outcome, effect = _forward(db, rules, command)
        else:
            outcome, effect = _compensate(db, rules, command)
    extra = {**command.log_fields(), "outcome": outcome.status if outcome else "dropped", "effect": effect}
    if outcome is None:
        log.info("command dropped on purpose", extra=extra)
        return None
    log.info("command handled", extra={**extra, "reason": outcome.reason})
    return reply_body(command, outcome)


def _forward(db: sqlite3.Connection, rules: ParticipantRules, command: Command) -> tuple[Outcome | None, str]:
    if _lost_in_transit(db, command):
        return None, "none"
    row = db.execute(
        "SELECT status, reason, data FROM replies WHERE saga_id = ? AND command = ?", (command.saga_id, command.name)
    ).fetchone()
    if row is not None:
        return Outcome(row[0], row[1], json.loads(row[2])), "repeat"
    tombstone = db.execute(
        "SELECT 1 FROM tombstones WHERE saga_id = ? AND participant = ?", (command.saga_id, rules.name)
    ).fetchone()
    if tombstone:
        outcome = _failure("already_compensated")
    else:
        try:
            outcome = rules.apply(db, command)
        except InvalidPayload as error:  # raised before any write, so nothing to undo
            outcome = _failure("invalid_payload", detail=str(error))
    db.execute(
        "INSERT INTO replies (saga_id, command, status, reason, data) VALUES (?, ?, ?, ?, ?)",
        (command.saga_id, command.name, outcome.status, outcome.reason, json.dumps(outcome.data)),
    )
    return outcome, "applied" if outcome.status == "success" else "none"


def _compensate(db: sqlite3.Connection, rules: ParticipantRules, command: Command) -> tuple[Outcome, str]:
    # Decided from the effects, not remembered like a forward reply: a compensation sent again
    # after a late forward effect must still undo it.
    refused = db.execute(
        "SELECT 1 FROM refusals WHERE participant = ? AND until > ?", (rules.name, time.time())
    ).fetchone()
    if refused:
        return _failure(COMPENSATION_REFUSED), "refused"
    effects = {
        row[0]
        for row in db.execute(
            "SELECT DISTINCT effect FROM ledger WHERE saga_id = ? AND participant = ?", (command.saga_id, rules.name)
        )
    }
    if rules.applied_effect not in effects:
        db.execute(
            "INSERT OR IGNORE INTO tombstones (saga_id, participant, at) VALUES (?, ?, ?)",
            (command.saga_id, rules.name, _now()),
        )
        return _success(), "tombstone"
    if rules.undone_effect in effects:
        return _success(), "none"
    rules.undo(db, command.saga_id)
    return _success(), "undone"


def _lost_in_transit(db: sqlite3.Connection, command: Command) -> bool:
    if command.name != "stock.reduce" or SILENT_ONCE_PRODUCT not in _product_ids(command.payload):
        return False
    cursor = db.execute(
        "INSERT OR IGNORE INTO dropped (saga_id, command) VALUES (?, ?)", (command.saga_id, command.name)
    )
    return cursor.rowcount == 1


@dataclass(frozen=True)
class ReplyPlan:
    delay: float = 0.0
    copies: int = 1


def reply_plan(body: dict) -> ReplyPlan:
    """How the reply to this command travels: late (sku-slow) or twice (sku-dup)."""
    payload = body.get("payload")
    command = body.get("command")
    if not isinstance(payload, dict) or not isinstance(command, str) or not command.startswith("stock."):
        return ReplyPlan()
    products = _product_ids(payload)
    return ReplyPlan(
        delay=SLOW_REPLY_SECONDS if command == "stock.reduce" and SLOW_PRODUCT in products else 0.0,
        copies=2 if DUPLICATE_REPLY_PRODUCT in products else 1,
    )


# --- over RabbitMQ -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    routing_key: str
    correlation_id: str
    body: bytes


class ParticipantWorker:
    """Consumes one participant queue with its own Broker and ledger connection; run() in its own thread."""

    def __init__(self, queue_name: str, *, ledger_path: str | Path, prefetch: int = PREFETCH,
                 own_binding: str | None = None):
        self.queue_name = queue_name
        self.own_binding = own_binding  # a queue the runtime does not declare: this worker does
        self.prefix = queue_name.split(".", 1)[0] + "."
        self.ledger_path = ledger_path
        self.prefetch = prefetch
        self._late: list[tuple[float, int, _Reply]] = []  # heap of replies held back by sku-slow
        self._order = itertools.count()
        self.ledger: Ledger | None = None
        self.broker: Broker | None = None

    def run(self, should_stop: Callable[[], bool]) -> None:
        self.ledger, self.broker = Ledger(self.ledger_path), Broker()
        try:
            if self.own_binding is not None and not self._declare_own_queue(should_stop):
                return
            self.broker.consume(
                self.queue_name, self.on_delivery, prefetch=self.prefetch, should_stop=should_stop,
                tick=self.send_due_replies,
            )
            try:
                self.send_due_replies(everything=True)  # their commands are acked already
            except BrokerUnavailable:
                log.warning("late replies lost at shutdown", extra={"queue": self.queue_name, "count": len(self._late)})
        finally:
            self.broker.close()
            self.ledger.close()

    def _declare_own_queue(self, should_stop: Callable[[], bool]) -> bool:
        """Declare and bind this worker's queue, waiting for the broker; False if told to stop first."""
        backoff = Backoff()
        while not should_stop():
            try:
                self.broker.declare_queue(self.queue_name, exchange=COMMANDS_EXCHANGE, routing_key=self.own_binding)
                return True
            except BrokerUnavailable as error:
                pause = backoff.next()
                log.warning("cannot declare %s yet, retrying in %.1fs: %s", self.queue_name, pause, error)
                end = time.monotonic() + pause
                while not should_stop() and time.monotonic() < end:
                    time.sleep(0.1)
        return False

    def on_delivery(self, delivery: Delivery) -> None:
        try:
            body = json.loads(delivery.body)
        except ValueError:  # includes UnicodeDecodeError
            extra = {"queue": self.queue_name, "message_id": delivery.message_id}
            log.warning("command is not JSON, dropped", extra=extra)
            return
        command = body.get("command") if isinstance(body, dict) else None
        if isinstance(command, str) and not command.startswith(self.prefix):
            log.warning("command for another participant dropped", extra={"queue": self.queue_name, "command": command})
            return
        try:
            reply = handle_command(self.ledger, body)
        except sqlite3.OperationalError as error:  # ledger locked or unavailable: not the message's fault
            raise RetryLater(f"ledger unavailable: {error}") from error
        except Exception:  # a participant never dies of its input
            log.exception("command handling failed, dropped", extra={"queue": self.queue_name})
            return
        if reply is None:
            return
        plan = reply_plan(body)
        message = _Reply(delivery.reply_to or REPLIES_QUEUE, delivery.correlation_id or reply["saga_id"], encode(reply))
        due = time.monotonic() + plan.delay
        for _ in range(plan.copies):
            if plan.delay:
                heapq.heappush(self._late, (due, next(self._order), message))
            else:
                self._publish(message)

    def send_due_replies(self, *, everything: bool = False) -> None:
        while self._late and (everything or self._late[0][0] <= time.monotonic()):
            self._publish(self._late[0][2])
            heapq.heappop(self._late)  # only once published: a broker outage keeps it for the next tick

    def _publish(self, reply: _Reply) -> None:
        try:
            self.broker.publish(
                exchange="", routing_key=reply.routing_key, body=reply.body,
                correlation_id=reply.correlation_id, message_id=str(uuid.uuid4()),
            )
        except Unroutable:  # the asker's reply queue is gone; retrying would loop forever
            extra = {"queue": self.queue_name, "reply_to": reply.routing_key}
            log.warning("reply dropped, no such reply queue", extra=extra)


def start_participants(
    *, ledger_path: str | Path, should_stop: Callable[[], bool], prefetch: int = PREFETCH, with_shipping: bool = False
) -> list[threading.Thread]:
    """Start the stock, payment and order participants (and shipping if asked), one thread (and Broker) each."""
    Ledger(ledger_path).close()  # create and seed the file before the threads race for it
    queues = {queue_name: None for queue_name in PARTICIPANT_QUEUES}
    if with_shipping:
        queues[SHIPPING_QUEUE] = SHIPPING_BINDING
    threads = []
    for queue_name, own_binding in queues.items():
        worker = ParticipantWorker(queue_name, ledger_path=ledger_path, prefetch=prefetch, own_binding=own_binding)
        thread = threading.Thread(target=worker.run, args=(should_stop,), name=f"demo-{queue_name}", daemon=True)
        thread.start()
        threads.append(thread)
    return threads
