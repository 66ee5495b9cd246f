"""The order saga, declared as data: its steps in order, the command that does each one, the
command that undoes it, what each command carries, and what each success reply teaches us.

A payload is a selection of the saga's facts (user_id, items, currency, payment_method, and
`amount` / `order_id` once the participants have told us). A new saga type is a new tuple.
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    """A step's own waits and attempts; None takes the setting (SAGA_STEP_TIMEOUT_SECONDS,
    SAGA_RETRY_BACKOFF, SAGA_RETRY_MAX_SECONDS, SAGA_STEP_MAX_ATTEMPTS, SAGA_COMPENSATION_MAX_ATTEMPTS)."""

    timeout: float | None = None
    backoff: float | None = None
    max_wait: float | None = None
    attempts: int | None = None
    compensation_attempts: int | None = None


@dataclass(frozen=True)
class StepDefinition:
    name: str
    command: str
    compensation: str
    payload: tuple[str, ...]
    compensation_payload: tuple[str, ...]
    # reply `data` field -> saga fact; each is required in a success reply
    learns: tuple[tuple[str, str], ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)


ORDER_SAGA: tuple[StepDefinition, ...] = (
    StepDefinition(
        name="reduce_stock",
        command="stock.reduce",
        compensation="stock.restore",
        payload=("items",),
        compensation_payload=("items",),
        learns=(("total", "amount"),),
    ),
    StepDefinition(
        name="take_payment",
        command="payment.take",
        compensation="payment.refund",
        payload=("user_id", "amount", "currency", "payment_method"),
        compensation_payload=("user_id", "amount", "currency", "payment_method"),
    ),
    StepDefinition(
        name="create_order",
        command="order.create",
        compensation="order.cancel",
        payload=("user_id", "items", "amount", "currency"),
        # order_id is added only when known (the contract: "plus order_id when one is known")
        compensation_payload=("user_id", "items", "amount", "currency", "order_id?"),
        learns=(("order_id", "order_id"),),
    ),
)

STEP_BY_COMMAND = {command: step for step in ORDER_SAGA for command in (step.command, step.compensation)}


def build_payload(fields: tuple[str, ...], facts: dict) -> dict:
    payload = {}
    for spec in fields:
        optional = spec.endswith("?")
        name = spec.rstrip("?")
        if optional and facts.get(name) is None:
            continue
        payload[name] = facts.get(name)
    return payload
