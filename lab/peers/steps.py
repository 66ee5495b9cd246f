"""The saga every peer runs: stock.reduce -> payment.take -> order.create, compensated in reverse
(order.cancel, payment.refund, stock.restore), each step one call of the demo participants' own
command handler on a SQLite ledger (see lab/peers/__init__.py for why)."""
from __future__ import annotations

import os
import threading
from pathlib import Path

from demo.participants import Ledger, handle_command

ITEMS = [{"product_id": "sku-1", "quantity": 1}]
USER_ID = "alice"
CURRENCY = "EUR"
PAYMENT_METHOD = "pm-123"
DECLINED_PAYMENT_METHOD = "pm-declined"  # demo/catalogue.py: payment.take fails, the saga is compensated

# forward command -> its compensation, in the saga's order
STEPS = (("stock.reduce", "stock.restore"), ("payment.take", "payment.refund"), ("order.create", "order.cancel"))

_ledgers = threading.local()


class StepFailed(Exception):
    """A participant answered a forward command with a failure: the saga must be compensated."""

    def __init__(self, command: str, reason: str | None):
        super().__init__(f"{command}: {reason}")
        self.command, self.reason = command, reason


def ledger_for(path: str | Path) -> Ledger:
    """One SQLite connection per thread and process: a connection crosses neither (Celery forks)."""
    key = (os.getpid(), str(path))
    cached = getattr(_ledgers, "ledger", None)
    if cached is None or cached[0] != key:
        _ledgers.ledger = (key, Ledger(path))
    return _ledgers.ledger[1]


def payload(command: str, facts: dict) -> dict:
    """What each command carries, as the order saga's declaration (sagas/flow.py) selects it."""
    if command.startswith("stock."):
        return {"items": facts["items"]}
    if command.startswith("payment."):
        return {key: facts.get(key) for key in ("user_id", "amount", "currency", "payment_method")}
    return {key: facts.get(key) for key in ("user_id", "items", "amount", "currency")} | (
        {"order_id": facts["order_id"]} if facts.get("order_id") else {})


def order_facts(*, payment_method: str = PAYMENT_METHOD) -> dict:
    return {"user_id": USER_ID, "items": ITEMS, "currency": CURRENCY, "payment_method": payment_method}


def run_command(ledger_path: str | Path, *, saga_id: str, command: str, facts: dict) -> dict:
    """One participant call; returns the reply's data, raises StepFailed on a failure reply."""
    body = {"saga_id": saga_id, "command": command, "attempt": 1, "payload": payload(command, facts)}
    reply = handle_command(ledger_for(ledger_path), body)
    if reply is None or reply["status"] != "success":
        raise StepFailed(command, None if reply is None else reply["reason"])
    return reply["data"]


def learned(command: str, data: dict) -> dict:
    """The facts a success reply teaches the saga (the `learns` of sagas/flow.py)."""
    if command == "stock.reduce":
        return {"amount": data["total"]}
    if command == "order.create":
        return {"order_id": data["order_id"]}
    return {}
