"""Demo data shared by the demo participants and the demo auth service.

Products (price, starting stock):
    sku-1          9.99   1 000 000
    sku-2         24.50   1 000 000
    sku-3        120.00   1 000 000
    sku-sold-out   5.00   0           -> stock.reduce fails with "out_of_stock"
Any other product id makes stock.reduce fail with "unknown_product".

Payment method "pm-declined" is always declined ("payment_declined"); any other is charged.
An order listing "sku-unorderable" (in stock, payable) is refused by the Order service
("order_rejected"), so the saga fails at its last step.

Tokens for `Authorization: Bearer <token>`:
    demo-alice -> alice, demo-bob -> bob, demo-staff -> staff (is_staff)

Behaviour triggers for tests and the fault-injection suite (plenty of stock). A stock command
that lists one of these products gets the behaviour:
    sku-slow         the reply to stock.reduce is sent 1.5 s late (other messages go on meanwhile)
    sku-silent-once  the first stock.reduce of each saga is dropped with no effect and no reply,
                     as if lost in transit, so the orchestrator has to send it again
    sku-dup          every stock reply (reduce and restore) is published twice
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True)
class Product:
    price: Decimal
    stock: int


@dataclass(frozen=True)
class DemoUser:
    user_id: str
    is_staff: bool = False


PLENTY = 1_000_000

SLOW_PRODUCT = "sku-slow"
SLOW_REPLY_SECONDS = 1.5
SILENT_ONCE_PRODUCT = "sku-silent-once"
DUPLICATE_REPLY_PRODUCT = "sku-dup"
SOLD_OUT_PRODUCT = "sku-sold-out"
UNORDERABLE_PRODUCT = "sku-unorderable"

PRODUCTS: dict[str, Product] = {
    "sku-1": Product(Decimal("9.99"), PLENTY),
    "sku-2": Product(Decimal("24.50"), PLENTY),
    "sku-3": Product(Decimal("120.00"), PLENTY),
    SOLD_OUT_PRODUCT: Product(Decimal("5.00"), 0),
    SLOW_PRODUCT: Product(Decimal("1.00"), PLENTY),
    SILENT_ONCE_PRODUCT: Product(Decimal("2.00"), PLENTY),
    DUPLICATE_REPLY_PRODUCT: Product(Decimal("3.00"), PLENTY),
    UNORDERABLE_PRODUCT: Product(Decimal("4.00"), PLENTY),
}

DECLINED_PAYMENT_METHOD = "pm-declined"

# the one copy of the demo tokens: the tests, the benchmark and the fault suite import these
CUSTOMER_TOKEN, OTHER_CUSTOMER_TOKEN, STAFF_TOKEN = "demo-alice", "demo-bob", "demo-staff"
TOKENS: dict[str, DemoUser] = {
    CUSTOMER_TOKEN: DemoUser("alice"),
    OTHER_CUSTOMER_TOKEN: DemoUser("bob"),
    STAFF_TOKEN: DemoUser("staff", is_staff=True),
}


def describe() -> str:
    """One line for a newcomer: what can be ordered and which tokens work."""
    products = ", ".join(f"{sku} {p.price} (stock {p.stock})" for sku, p in PRODUCTS.items())
    tokens = ", ".join(
        f"{token}={user.user_id}{' (staff)' if user.is_staff else ''}" for token, user in TOKENS.items()
    )
    return f"products: {products}; declined payment method: {DECLINED_PAYMENT_METHOD}; tokens: {tokens}"
