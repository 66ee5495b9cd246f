"""The fault schedule: which fault happens when, drawn from a seed so a run can be repeated.

Faults are spread over the load window, one slot each, and run one after another (never two
at once), so every fault's effect can be told apart in the logs. Poison batches are published
between faults, never during one: a broker restart while publishing could make a message
ambiguous (sent or not?), and the dead-letter check needs to know exactly what was sent.

The schedule is also what the checker holds outcomes against: a saga may end `failed` only when
a `refuse_compensations` fault (opt-in) made its participant refuse while it ran, and an order
that should complete may be compensated by timeouts only during or just after a fault that
delays replies.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

KILL_CONSUMER = "kill_consumer"
RESTART_RABBITMQ = "restart_rabbitmq"
FLUSH_REDIS = "flush_redis"
RESTART_POSTGRES = "restart_postgres"
KILL_WEB = "kill_web"
REFUSE_COMPENSATIONS = "refuse_compensations"
FAULT_KINDS = (KILL_CONSUMER, RESTART_RABBITMQ, FLUSH_REDIS, RESTART_POSTGRES, KILL_WEB)
# Only when asked for (--kinds): it makes sagas end `failed` on purpose, which a run of the
# default kinds treats as a failure of the service.
OPT_IN_KINDS = (REFUSE_COMPENSATIONS,)
# What the checker may blame on a fault scheduled at the time: replies late enough for a step to
# run out of attempts (its saga compensated with `<step>_timed_out`) ...
DELAYS_REPLIES = frozenset({KILL_CONSUMER, KILL_WEB, RESTART_RABBITMQ, RESTART_POSTGRES})
# ... and a compensation given up on (its saga `failed`), for the participant the fault targets.
REFUSES_COMPENSATIONS = frozenset({REFUSE_COMPENSATIONS})
PARTICIPANTS = ("stock", "payment", "order")

# how long the broken thing stays down, in seconds (drawn uniformly)
DOWNTIME = {
    KILL_CONSUMER: (0.2, 2.0),
    KILL_WEB: (0.2, 1.5),
    RESTART_RABBITMQ: (0.5, 3.0),
    RESTART_POSTGRES: (0.5, 3.0),
    FLUSH_REDIS: (0.0, 0.0),
    # long enough for a few compensations to run out of attempts at the fault suite's 1 s timeout
    REFUSE_COMPENSATIONS: (5.0, 15.0),
}


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the load started
    kind: str
    target: str | None = None  # the consumer killed, or the participant that refuses compensations
    down: float = 0.0

    def describe(self) -> str:
        target = f" {self.target}" if self.target else ""
        down = f" down {self.down:.1f}s" if self.down else ""
        return f"{self.kind}{target}{down}"


@dataclass(frozen=True)
class PoisonBatch:
    at: float
    first: int  # index of the first poison message of the batch
    count: int

    def describe(self) -> str:
        return f"poison x{self.count}"


def plan_faults(*, seed: int, count: int, window: tuple[float, float], consumers: int,
                kinds: tuple[str, ...] = FAULT_KINDS) -> list[Fault]:
    """`count` faults in `window` (seconds after the load starts). Every kind appears once
    before any appears twice, so a short schedule still covers them all."""
    unknown = sorted(set(kinds) - set(FAULT_KINDS) - set(OPT_IN_KINDS))
    if unknown:
        raise ValueError(f"unknown fault kinds {', '.join(unknown)}; known: {', '.join(FAULT_KINDS + OPT_IN_KINDS)}")
    if count <= 0:
        return []
    rng = random.Random(f"faults-{seed}")
    bag: list[str] = []
    while len(bag) < count:
        bag.extend(rng.sample(kinds, len(kinds)))
    start, end = window
    slot = (end - start) / count
    faults = []
    for index, kind in enumerate(bag[:count]):
        at = start + index * slot + rng.uniform(0.05, 0.5) * slot
        target = None
        if kind == KILL_CONSUMER:
            target = f"consumer-{rng.randint(1, consumers)}"
        elif kind == REFUSE_COMPENSATIONS:
            target = rng.choice(PARTICIPANTS)
        low, high = DOWNTIME[kind]
        faults.append(Fault(at=round(at, 2), kind=kind, target=target, down=round(rng.uniform(low, high), 2)))
    return faults


def plan_poison(*, seed: int, count: int, window: tuple[float, float], batches: int = 4) -> list[PoisonBatch]:
    """`count` poison messages in up to `batches` batches at random moments of `window`."""
    if count <= 0:
        return []
    rng = random.Random(f"poison-{seed}")
    batches = max(1, min(batches, count))
    sizes = [count // batches + (1 if i < count % batches else 0) for i in range(batches)]
    moments = sorted(rng.uniform(*window) for _ in range(batches))
    plan, first = [], 0
    for at, size in zip(moments, sizes):
        plan.append(PoisonBatch(at=round(at, 2), first=first, count=size))
        first += size
    return plan
