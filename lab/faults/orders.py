"""The shop front of a fault run: orders of every kind, sent over HTTP by the lab's order client
as a careful client sends them (one Idempotency-Key per order, the same key on every retry), so
an order counts as accepted only once a 2xx came back."""
from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal

from demo.catalogue import (
    DECLINED_PAYMENT_METHOD,
    DUPLICATE_REPLY_PRODUCT,
    PRODUCTS,
    SILENT_ONCE_PRODUCT,
    SLOW_PRODUCT,
    SOLD_OUT_PRODUCT,
)
from lab.order_client import OrderClient, Submission

# kind -> weight
MIX = {"normal": 50, "sold_out": 10, "declined": 10, "slow": 7, "silent_once": 12, "dup": 11}
# outcomes that are wrong whatever the faults (a timed-out step may turn any other order into
# `compensated`, and a late reply can still win the race against its deadline)
FORBIDDEN = {"sold_out": {"completed"}, "declined": {"completed"}}
# kinds that complete when nothing goes wrong: compensated by a timeout, one of them needs a fault
# that delays replies to explain it. Not "slow": its every stock reply comes 1.5 s late, which
# outlasts the suite's 1 s step timeout unless a backoff makes a later attempt wait longer.
SHOULD_COMPLETE = frozenset({"normal", "silent_once", "dup"})


@dataclass(kw_only=True)
class Order(Submission):
    """An order of the run: its number, its kind (MIX) and always an Idempotency-Key."""

    number: int
    kind: str

    @property
    def expected_total(self) -> Decimal:
        return sum((PRODUCTS[item["product_id"]].price * item["quantity"] for item in self.body["items"]), Decimal("0"))


def make_orders(*, count: int, seed: int, run_id: str, mix: dict[str, int] = MIX) -> list[Order]:
    rng = random.Random(f"orders-{seed}")
    kinds, weights = zip(*mix.items())
    orders = []
    for number in range(count):
        kind = rng.choices(kinds, weights)[0]
        orders.append(Order(number=number, kind=kind, key=f"{run_id}-{number}", body=order_body(kind, rng)))
    return orders


def order_body(kind: str, rng: random.Random) -> dict:
    normal = [{"product_id": sku, "quantity": rng.randint(1, 3)} for sku in rng.sample(["sku-1", "sku-2"], rng.randint(1, 2))]
    trigger = {"sold_out": SOLD_OUT_PRODUCT, "slow": SLOW_PRODUCT, "silent_once": SILENT_ONCE_PRODUCT,
               "dup": DUPLICATE_REPLY_PRODUCT}.get(kind)
    items = normal if trigger is None else [{"product_id": trigger, "quantity": rng.randint(1, 2)}, *normal[:1]]
    method = DECLINED_PAYMENT_METHOD if kind == "declined" else f"pm-{rng.randint(100, 999)}"
    return {"items": items, "currency": "EUR", "payment_method": method}


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
