"""The shop front of a fault run: orders of every kind, sent over HTTP the way a careful client
sends them (one Idempotency-Key per order, the same key on every retry), so an order counts as
accepted only once a 2xx came back."""
from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal

import requests

from sagas.demo.catalogue import (
    DECLINED_PAYMENT_METHOD,
    DUPLICATE_REPLY_PRODUCT,
    PRODUCTS,
    SILENT_ONCE_PRODUCT,
    SLOW_PRODUCT,
    SOLD_OUT_PRODUCT,
)

TOKEN = "demo-alice"
RETRY_STATUSES = (503,)

# kind -> weight
MIX = {"normal": 50, "sold_out": 10, "declined": 10, "slow": 7, "silent_once": 12, "dup": 11}
# outcomes that are wrong whatever the faults (a timed-out step may turn any other order into
# `compensated`, and a late reply can still win the race against its deadline)
FORBIDDEN = {"sold_out": {"completed"}, "declined": {"completed"}}
# kinds that complete when nothing goes wrong: compensated by a timeout, one of them needs a fault
# that delays replies to explain it. Not "slow": its every stock reply comes 1.5 s late, which
# outlasts the suite's 1 s step timeout unless a backoff makes a later attempt wait longer.
SHOULD_COMPLETE = frozenset({"normal", "silent_once", "dup"})


@dataclass
class Order:
    number: int
    kind: str
    key: str
    body: dict
    # filled in by the client
    status_code: int | None = None
    saga_id: str | None = None
    accepted_at: float | None = None
    problems: Counter = field(default_factory=Counter)

    @property
    def accepted(self) -> bool:
        return self.saga_id is not None

    @property
    def expected_total(self) -> Decimal:
        return sum((PRODUCTS[item["product_id"]].price * item["quantity"] for item in self.body["items"]), Decimal("0"))


def make_orders(*, count: int, seed: int, run_id: str, mix: dict[str, int] = MIX) -> list[Order]:
    rng = random.Random(f"orders-{seed}")
    kinds, weights = zip(*mix.items())
    orders = []
    for number in range(count):
        kind = rng.choices(kinds, weights)[0]
        orders.append(Order(number, kind, f"{run_id}-{number}", order_body(kind, rng)))
    return orders


def order_body(kind: str, rng: random.Random) -> dict:
    normal = [{"product_id": sku, "quantity": rng.randint(1, 3)} for sku in rng.sample(["sku-1", "sku-2"], rng.randint(1, 2))]
    trigger = {"sold_out": SOLD_OUT_PRODUCT, "slow": SLOW_PRODUCT, "silent_once": SILENT_ONCE_PRODUCT,
               "dup": DUPLICATE_REPLY_PRODUCT}.get(kind)
    items = normal if trigger is None else [{"product_id": trigger, "quantity": rng.randint(1, 2)}, *normal[:1]]
    method = DECLINED_PAYMENT_METHOD if kind == "declined" else f"pm-{rng.randint(100, 999)}"
    return {"items": items, "currency": "EUR", "payment_method": method}


class OrderClient:
    """POSTs orders, retrying connection errors, timeouts and 503 with the same key until `give_up_after`."""

    def __init__(self, base_url: str, *, give_up_after: float = 120.0, timeout: tuple[float, float] = (2.0, 20.0)):
        self.url = f"{base_url}/orders/create_order"
        self.give_up_after = give_up_after
        self.timeout = timeout
        self._local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def submit(self, order: Order) -> Order:
        end, pause = time.monotonic() + self.give_up_after, 0.1
        headers = {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": order.key}
        while True:
            try:
                response = self._session().post(self.url, json=order.body, headers=headers, timeout=self.timeout)
            except requests.RequestException as error:
                order.problems[type(error).__name__] += 1
                self._local.__dict__.pop("session", None)  # a fresh connection after a dropped one
            else:
                order.status_code = response.status_code
                if 200 <= response.status_code < 300:
                    try:
                        order.saga_id = response.json()["saga_id"]
                    except (ValueError, KeyError, TypeError):
                        order.problems[f"http {response.status_code} without a saga_id"] += 1
                        return order
                    order.accepted_at = time.time()
                    return order
                order.problems[f"http {response.status_code}"] += 1
                if response.status_code not in RETRY_STATUSES:
                    return order
            if time.monotonic() + pause > end:
                return order
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def send_all(client: OrderClient, orders: list[Order], *, duration: float, concurrency: int) -> None:
    """Send every order, paced evenly over `duration` seconds (0: as fast as `concurrency` allows)."""
    started = time.time()
    interval = duration / len(orders) if duration > 0 and orders else 0.0
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="shop") as pool:
        sending = []
        for index, order in enumerate(orders):
            due = started + index * interval
            if interval and due > time.time():
                time.sleep(due - time.time())
            sending.append((order, pool.submit(client.submit, order)))
    for order, future in sending:
        if future.exception() is not None:  # a bug of the client: the order shows as not accepted
            order.problems[f"client error {future.exception()!r}"] += 1
