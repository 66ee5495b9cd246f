"""The raw broker baseline for lab/benchmark.py: 3-step command/reply chains with no state.

One process, one thread, one `sagas.broker.Broker` (so the same pika settings, persistent
messages and publisher confirms as the orchestrator), driving chains against the demo
participants: stock.reduce -> payment.take -> order.create, each command published to
saga.commands with reply_to = this process's own exclusive reply queue; the next command goes
out when the reply to the previous one arrives. Nothing is stored anywhere but in memory; every
chain gets a fresh uuid4 as its saga_id (the participants are idempotent per saga_id and command).

Like the saga consumer, it publishes the next command from inside the consume callback on the
same connection, so the comparison is "same messaging, minus the orchestrator's state".

    python -m lab.raw_chain --chains 2000 --concurrency 16 --single 200

prints one JSON line with the results (needs the stack's environment: RABBITMQ_*, Django settings).
"""
from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from dataclasses import dataclass, field

import django

from sagas import engine
from sagas.broker import COMMANDS_EXCHANGE, Broker, Delivery, encode
from sagas.flows import ORDER_FLOW, build_payload

ITEMS = [{"product_id": "sku-1", "quantity": 1}]
STEPS = tuple(s.command for s in ORDER_FLOW.steps)


@dataclass
class Chain:
    saga_id: str
    started: float
    step: int = 0
    total: str | None = None


@dataclass
class Pass:
    """`count` chains with `concurrency` of them in flight."""

    name: str
    count: int
    concurrency: int
    in_flight: dict[str, Chain] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    started_chains: int = 0
    failures: list[str] = field(default_factory=list)
    first_sent: float | None = None
    last_done: float | None = None
    cpu_start: float | None = None
    cpu_end: float | None = None

    @property
    def finished(self) -> bool:
        return not self.in_flight and self.started_chains >= self.count

    def result(self, *, broker_lost: bool) -> dict:
        done = len(self.latencies)
        elapsed = (self.last_done - self.first_sent) if done else 0.0
        return {
            "chains": self.count, "completed": done, "concurrency": self.concurrency,
            "seconds": round(elapsed, 3), "chains_per_s": round(done / elapsed, 2) if elapsed else 0.0,
            "latencies_ms": [round(x * 1000, 3) for x in self.latencies], "failures": self.failures[:10],
            "timed_out": self.count - done - len(self.failures), "broker_lost": broker_lost,
            "cpu_seconds": round((self.cpu_end or time.process_time()) - (self.cpu_start or 0.0), 3),
        }


class Driver:
    """Runs the passes one after the other inside ONE consume of the reply queue: the queue is
    auto-delete, so ending a consume would delete it."""

    def __init__(self, passes: list[Pass], broker: Broker, reply_queue: str):
        self.passes, self.broker, self.reply_queue = passes, broker, reply_queue
        self.current = 0

    def run(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # A lost connection takes the exclusive reply queue with it: stop rather than let
        # Broker.consume retry the vanished queue (Broker.close() clears its connection).
        self._begin_pass()
        self.broker.consume(self.reply_queue, self._on_reply, prefetch=100,
                            should_stop=lambda: self.done or self.lost or time.monotonic() > deadline,
                            tick_seconds=0.05)

    @property
    def lost(self) -> bool:
        return not self.broker.connected

    @property
    def done(self) -> bool:
        return self.current >= len(self.passes)

    def _begin_pass(self) -> None:
        while not self.done and self.passes[self.current].count == 0:
            self.current += 1
        if not self.done:
            current = self.passes[self.current]
            current.cpu_start = time.process_time()
            for _ in range(min(current.concurrency, current.count)):
                self._start_chain(current)

    def _start_chain(self, current: Pass) -> None:
        chain = Chain(saga_id=str(uuid.uuid4()), started=time.perf_counter())
        if current.first_sent is None:
            current.first_sent = chain.started
        current.in_flight[chain.saga_id] = chain
        current.started_chains += 1
        self._send(chain)

    def _send(self, chain: Chain) -> None:
        command = STEPS[chain.step]
        facts = {"user_id": "alice", "items": ITEMS, "amount": chain.total, "currency": "EUR",
                 "payment_method": None}
        payload = build_payload(ORDER_FLOW.steps[chain.step].payload, facts)
        body = engine.Command(chain.saga_id, command, 1, payload).body()
        self.broker.publish(exchange=COMMANDS_EXCHANGE, routing_key=command, body=encode(body),
                            correlation_id=chain.saga_id, reply_to=self.reply_queue)

    def _on_reply(self, delivery: Delivery) -> None:
        if self.done:
            return
        current = self.passes[self.current]
        reply = json.loads(delivery.body)
        chain = current.in_flight.get(reply.get("saga_id"))
        if chain is None or reply.get("command") != STEPS[chain.step]:
            return  # a duplicate, or a leftover of an earlier pass
        if reply.get("status") != "success":
            current.failures.append(f"{reply.get('command')}: {reply.get('reason')}")
            del current.in_flight[chain.saga_id]
        elif chain.step + 1 < len(STEPS):
            if chain.step == 0:
                chain.total = reply["data"]["total"]
            chain.step += 1
            self._send(chain)
            return
        else:
            now = time.perf_counter()
            current.latencies.append(now - chain.started)
            current.last_done = now
            del current.in_flight[chain.saga_id]
        if current.started_chains < current.count:
            self._start_chain(current)
        elif current.finished:
            current.cpu_end = time.process_time()
            self.current += 1
            self._begin_pass()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=2000, help="chains in the throughput pass")
    parser.add_argument("--concurrency", type=int, default=16, help="chains in flight in the throughput pass")
    parser.add_argument("--single", type=int, default=200, help="chains in the one-in-flight pass (0: skip)")
    parser.add_argument("--warmup", type=int, default=50, help="chains before measuring (not reported)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds all passes together may take")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestration_site.settings")
    django.setup()

    broker = Broker()
    # A private queue for the replies: exclusive, gone with this connection. Bound to amq.direct
    # under its own unique key only because that is what Broker offers; replies come by name.
    reply_queue = broker.bind_temporary_queue("amq.direct", f"raw-chain-{uuid.uuid4()}")
    passes = [Pass("warmup", args.warmup, args.concurrency), Pass("throughput", args.chains, args.concurrency),
              Pass("single", args.single, 1)]
    driver = Driver(passes, broker, reply_queue)
    try:
        driver.run(timeout=args.timeout)
        lost = driver.lost
    finally:
        broker.close()
    results = {"reply_queue": reply_queue}
    results.update({p.name: p.result(broker_lost=lost) for p in passes[1:] if p.count})
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
