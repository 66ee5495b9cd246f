"""Flows as data: a flow's steps in order, the command that does each one, the command that
undoes it, what each command carries, and what each success reply teaches us.

A payload is a selection of the saga's facts (user_id, items, currency, payment_method, and
`amount` / `order_id` once the participants have told us). A new saga type is a new `Flow`; a
change to a flow is a new version registered beside the old one, which stays while sagas started
on it are unfinished (each saga records the (name, version) it started on and finishes on it).
"""
from __future__ import annotations

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


@dataclass(frozen=True)
class Flow:
    name: str
    version: int
    steps: tuple[StepDefinition, ...]

    def step(self, name: str) -> StepDefinition:
        return next(step for step in self.steps if step.name == name)

    def step_of(self, command: str) -> StepDefinition | None:
        """The step that `command` does or undoes; None if this flow has no such command."""
        return next((step for step in self.steps if command in (step.command, step.compensation)), None)

    @property
    def commands(self) -> frozenset[str]:
        return frozenset(command for step in self.steps for command in (step.command, step.compensation))

    @property
    def participants(self) -> frozenset[str]:
        return frozenset(participant_of(command) for command in self.commands)

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"


class UnknownFlow(LookupError):
    """A saga names a flow (name, version) that no module registered."""


def participant_of(command: str) -> str:
    return command.partition(".")[0]


ORDER_FLOW = Flow("order", 1, (
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
))

_registry: dict[tuple[str, int], Flow] = {}


def register(flow: Flow) -> Flow:
    """Make `flow` known (the next version of a flow is registered beside the earlier ones)."""
    known = _registry.setdefault((flow.name, flow.version), flow)
    if known is not flow and known != flow:
        raise ValueError(f"flow {flow} is already registered with other steps: give the change a new version")
    return flow


def unregister(flow: Flow) -> None:
    """Forget `flow` (an old version no unfinished saga uses any more; tests' own flows)."""
    if _registry.get((flow.name, flow.version)) == flow:
        del _registry[(flow.name, flow.version)]


def get(name: str, version: int) -> Flow:
    try:
        return _registry[(name, version)]
    except KeyError:
        raise UnknownFlow(f"no flow {name} v{version} is registered") from None


def latest(name: str) -> Flow:
    """The version new sagas of this flow start on."""
    versions = [flow for (flow_name, _), flow in _registry.items() if flow_name == name]
    if not versions:
        raise UnknownFlow(f"no flow {name} is registered")
    return max(versions, key=lambda flow: flow.version)


def registered() -> list[Flow]:
    return list(_registry.values())


def any_step_of(command: str) -> StepDefinition | None:
    """The step of a registered flow that `command` belongs to (the newest flow's, if several
    share it); None: no registered flow has this command."""
    for flow in sorted(_registry.values(), key=lambda flow: flow.version, reverse=True):
        step = flow.step_of(command)
        if step is not None:
            return step
    return None


register(ORDER_FLOW)


def build_payload(fields: tuple[str, ...], facts: dict) -> dict:
    payload = {}
    for spec in fields:
        optional = spec.endswith("?")
        name = spec.rstrip("?")
        if optional and facts.get(name) is None:
            continue
        payload[name] = facts.get(name)
    return payload
