"""One fault run, start to end: a sandbox (database, Redis db, vhost), the service as real
processes (web, N consumers, the demo participants and auth), a few hundred orders over HTTP,
faults and poison on a seeded schedule meanwhile, then heal, drain, and check.

    result = run_scenario(ScenarioConfig(sagas=150, faults=5, seed=7))
    print(result.summary())
"""
from __future__ import annotations

import logging
import os
import random
import secrets
import statistics
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from demo.participants import refuse_compensations
from lab.faults import infra
from lab.faults.checker import (
    EVENTS_QUEUE,
    TERMINAL,
    CheckReport,
    FaultWindow,
    SagaRow,
    check,
    read_sagas,
    unfinished,
    unsent_outbox,
)
from lab.faults.orders import MIX, Order, make_orders, send_all
from lab.faults.poison import poison_messages
from lab.faults.schedule import (
    FAULT_KINDS,
    FLUSH_REDIS,
    KILL_CONSUMER,
    KILL_WEB,
    REFUSE_COMPENSATIONS,
    RESTART_POSTGRES,
    RESTART_RABBITMQ,
    Fault,
    PoisonBatch,
    plan_faults,
    plan_poison,
)
from lab.order_client import OrderClient
from lab.sandbox import Sandbox
from lab.stack import ROOT, Stack, free_port
from sagas.broker import EVENTS_EXCHANGE, PARTICIPANT_QUEUES, REPLIES_QUEUE

log = logging.getLogger(__name__)

SECONDS_PER_FAULT = 8.0  # default spacing of faults when no duration is given
QUIET_SECONDS = 3.0  # nothing moving for this long (longer than sku-slow's 1.5 s) ends the drain


@dataclass
class ScenarioConfig:
    sagas: int = 300
    faults: int = 5
    consumers: int = 2
    seed: int | None = None
    duration: float | None = None  # seconds to spread orders and faults over; 0: as fast as possible
    concurrency: int = 16
    poison: int | None = None  # default: 12, or none in a run without faults
    drain_timeout: float = 180.0
    step_timeout: float = 1.0
    step_max_attempts: int = 3
    compensation_max_attempts: int = 10
    redis_db: int = int(os.environ.get("FAULTS_REDIS_DB", "11"))  # a Redis db of its own: flushed!
    fault_kinds: tuple[str, ...] = FAULT_KINDS
    mix: dict[str, int] = field(default_factory=lambda: dict(MIX))
    log_dir: Path | None = None
    log_level: str = "INFO"
    keep: bool = False  # keep the database and vhost for a look afterwards

    def resolved(self) -> "ScenarioConfig":
        seed = self.seed if self.seed is not None else random.randrange(1, 10**6)
        duration = self.duration if self.duration is not None else (self.faults * SECONDS_PER_FAULT if self.faults else 0.0)
        poison = self.poison if self.poison is not None else (12 if self.faults else 0)
        return ScenarioConfig(**{**self.__dict__, "seed": seed, "duration": duration, "poison": poison})


@dataclass
class Happening:
    planned: float
    what: str
    started: float = 0.0
    took: float = 0.0
    error: str | None = None
    fault: Fault | None = None  # None for a poison batch


@dataclass
class ScenarioResult:
    config: ScenarioConfig
    report: CheckReport
    throughput: dict
    happenings: list[Happening]
    drained_after: float | None
    log_dir: Path

    @property
    def ok(self) -> bool:
        return self.report.ok and not any(h.error for h in self.happenings)

    def summary(self) -> str:
        c = self.config
        lines = [f"fault run: seed {c.seed}, {c.sagas} sagas, {c.faults} faults, {c.consumers} consumers,"
                 f" {c.poison} poison, duration {c.duration:.0f}s, logs {self.log_dir}"]
        if self.happenings:
            lines.append("schedule (planned s / started s / took s):")
            lines += [f"  {h.planned:7.2f} {h.started:7.2f} {h.took:6.2f}  {h.what}{'  ERROR ' + h.error if h.error else ''}"
                      for h in self.happenings]
        drained = "not drained" if self.drained_after is None else f"drained {self.drained_after:.1f}s after the load"
        lines.append(drained)
        lines.append(self.report.table())
        t = self.throughput
        lines.append(f"throughput: accepted {t['accepted_per_s']:.1f}/s over {t['send_seconds']:.1f}s;"
                     f" finished {t['finished_per_s']:.1f}/s (completed {t['completed_per_s']:.1f}/s)"
                     f" over {t['finish_seconds']:.1f}s;"
                     f" saga latency p50 {t['latency_p50']:.2f}s p95 {t['latency_p95']:.2f}s max {t['latency_max']:.2f}s")
        lines += [f"note: {note}" for note in self.report.notes]
        lines += [f"PROBLEM: {detail}" for detail in self.report.details[:60]]
        if len(self.report.details) > 60:
            lines.append(f"... and {len(self.report.details) - 60} more problems")
        failed = self.report.row("  failed").value
        caused = failed - self.report.row("FAILED sagas the schedule did not cause").value
        reported = (f"; {failed} failed sagas reported above (compensation gave up: staff must act),"
                    f" {caused} of them made so by the schedule's refusals") if failed else ""
        lines.append("RESULT: " + ("all checks passed" if self.ok else
                                   "FAILED: " + ", ".join(r.name for r in self.report.failures)) + reported)
        return "\n".join(lines)


class Scenario:
    def __init__(self, config: ScenarioConfig, *, out=print):
        self.config = config.resolved()
        self.out = out
        self.run_id = f"faults_{self.config.seed}_{secrets.token_hex(3)}"
        self.log_dir = Path(self.config.log_dir or ROOT / "var" / "faults" / self.run_id)
        self.sandbox = Sandbox.named(self.run_id, redis_db=self.config.redis_db)
        self.stack: Stack | None = None
        self.orders: list[Order] = []
        self.poison_ids: list[str] = []
        self.happenings: list[Happening] = []
        self.load_started = 0.0

    # --- the run ---------------------------------------------------------------------------

    def run(self) -> ScenarioResult:
        c = self.config
        self.out(f"fault run {self.run_id}: seed {c.seed} (repeat with --seed {c.seed}), {c.sagas} sagas,"
                 f" {c.faults} faults, {c.consumers} consumers, logs in {self.log_dir}")
        self.sandbox.create()
        try:
            self._start_service()
            faults = plan_faults(seed=c.seed, count=c.faults, window=(0.05 * c.duration, 0.9 * c.duration),
                                 consumers=c.consumers, kinds=c.fault_kinds)
            poison = plan_poison(seed=c.seed, count=c.poison, window=(0.1 * c.duration, 0.95 * c.duration))
            plan = sorted([*faults, *poison], key=lambda item: item.at)
            for item in plan:
                self.out(f"  planned {item.at:7.2f}s  {item.describe()}")
            self.orders = make_orders(count=c.sagas, seed=c.seed, run_id=self.run_id, mix=c.mix)
            client = OrderClient(f"http://127.0.0.1:{self.stack.web_port}")
            self.load_started = time.time()
            events = threading.Thread(target=self._play, args=(plan,), name="fault-schedule", daemon=True)
            events.start()
            send_all(client, self.orders, duration=c.duration, concurrency=c.concurrency)
            load_ended = time.time()
            events.join()
            accepted = sum(order.accepted for order in self.orders)
            self.out(f"load done in {load_ended - self.load_started:.1f}s: {accepted}/{len(self.orders)} accepted")
            died = self._heal()
            drained_after = self._drain()
            self._stop_service()
            sagas = read_sagas(self.sandbox.database_url)  # nothing runs any more: one read serves both
            report = check(orders=self.orders, sagas=sagas, database_url=self.sandbox.database_url,
                           redis_db=c.redis_db, ledger_path=self.stack.ledger, vhost=self.sandbox.vhost,
                           poison_ids=self.poison_ids, died_on_their_own=died, faults=self._fault_windows())
            throughput = self._throughput(load_ended, sagas)
            return ScenarioResult(c, report, throughput, self.happenings, drained_after, self.log_dir)
        finally:
            try:
                infra.heal()
            finally:
                if self.stack:
                    self.stack.stop_all()
                if not c.keep:
                    self.sandbox.destroy()

    def _start_service(self) -> None:
        c = self.config
        self.stack = Stack.create(
            log_dir=self.log_dir, web_port=free_port(), auth_port=free_port(), ledger=self.log_dir / "ledger.sqlite3",
            **self.sandbox.environment(), RABBITMQ_HOST=infra.RABBITMQ_HOST,
            SAGA_STEP_TIMEOUT_SECONDS=c.step_timeout, SAGA_STEP_MAX_ATTEMPTS=c.step_max_attempts,
            SAGA_COMPENSATION_MAX_ATTEMPTS=c.compensation_max_attempts, LOG_LEVEL=c.log_level, DJANGO_DEBUG="0",
        )
        migrated = self.stack.manage("migrate", "--no-input", check=False)
        if migrated.returncode != 0:
            raise RuntimeError(f"migrate failed: {migrated.stderr[-2000:]}")
        self.stack.start_participants()
        for number in range(1, c.consumers + 1):
            self.stack.start_consumer(number)
        self.stack.start_web(access_log=False)
        self.stack.wait_auth()
        self.stack.wait_web()
        end = time.monotonic() + 30
        while not infra.queue_exists(self.sandbox.vhost, REPLIES_QUEUE):  # the consumers declare the topology
            if time.monotonic() > end:
                raise RuntimeError("the consumers did not declare the topology within 30s")
            time.sleep(0.2)
        # listen to saga.events as a related service would: every finished saga must be told
        infra.declare_queue(self.sandbox.vhost, EVENTS_QUEUE, bind_to=(EVENTS_EXCHANGE, "saga.*"))

    def _stop_service(self) -> None:
        # participants first: they flush replies they hold back (sku-slow) to the consumers
        for name in ["web", "participants", *[n for n in self.stack.services if n.startswith("consumer-")]]:
            self.stack.stop(name)

    # --- faults and poison ---------------------------------------------------------------------

    def _play(self, plan: list[Fault | PoisonBatch]) -> None:
        for item in plan:
            delay = self.load_started + item.at - time.time()
            if delay > 0:
                time.sleep(delay)
            happening = Happening(item.at, item.describe(), started=time.time() - self.load_started,
                                  fault=item if isinstance(item, Fault) else None)
            self.happenings.append(happening)
            began = time.monotonic()
            try:
                if isinstance(item, PoisonBatch):
                    self._poison(item)
                else:
                    self._fault(item)
            except Exception as error:  # the run goes on; the report shows it
                happening.error = repr(error)
                log.error("fault %s failed:\n%s", item.describe(), traceback.format_exc())
            happening.took = time.monotonic() - began
            self.out(f"  {happening.started:7.2f}s  {happening.what} ({happening.took:.1f}s)"
                     f"{'  ERROR ' + happening.error if happening.error else ''}")

    def _fault(self, fault: Fault) -> None:
        if fault.kind == KILL_CONSUMER:
            self.stack.kill(fault.target)
            time.sleep(fault.down)
            self.stack.restart(fault.target)
        elif fault.kind == KILL_WEB:
            self.stack.kill("web")
            time.sleep(fault.down)
            self.stack.restart("web")
            self.stack.wait_web()
        elif fault.kind == RESTART_RABBITMQ:
            infra.restart_rabbitmq(fault.down)
        elif fault.kind == RESTART_POSTGRES:
            infra.restart_postgres(fault.down)
        elif fault.kind == FLUSH_REDIS:
            self.sandbox.flush_redis()
        elif fault.kind == REFUSE_COMPENSATIONS:
            refuse_compensations(self.stack.ledger, participant=fault.target, seconds=fault.down)
            time.sleep(fault.down)  # faults never overlap: this one lasts until the refusals lapse
        else:
            raise ValueError(f"unknown fault {fault.kind}")

    def _poison(self, batch: PoisonBatch) -> None:
        saga_ids = [order.saga_id for order in self.orders if order.accepted]
        messages = poison_messages(run_id=self.run_id, first=batch.first, count=batch.count, saga_ids=saga_ids,
                                   seed=self.config.seed)
        infra.publish_raw(self.sandbox.vhost, messages)
        self.poison_ids.extend(message.message_id for _, message in messages)

    # --- afterwards ------------------------------------------------------------------------------

    def _fault_windows(self) -> list[FaultWindow]:
        return [FaultWindow(h.fault.kind, h.fault.target, self.load_started + h.started,
                            self.load_started + h.started + h.took) for h in self.happenings if h.fault]

    def _heal(self) -> list[str]:
        """Every shared service up, every process of the service running. Returns the processes
        that had died without being killed by the schedule."""
        started = infra.heal()
        if started:
            self.out(f"heal: started {', '.join(started)}")
        died = []
        for name, service in list(self.stack.services.items()):
            if not service.alive():
                died.append(f"{name} (exit {service.process.returncode}, log {service.log_path})")
                if name == "participants":
                    self.stack.start_participants(reset=False)  # keep the ledger: it is the evidence
                else:
                    self.stack.restart(name)
        if died:
            self.out(f"heal: restarted {', '.join(died)}")
        self.stack.wait_web()
        return died

    def _drain(self) -> float | None:
        """Wait until every saga is terminal and nothing moves (no unsent outbox row, no message in
        any queue) for QUIET_SECONDS. Returns how long it took, or None at the drain timeout."""
        began = time.monotonic()
        end = began + self.config.drain_timeout
        quiet_since, next_note = None, began + 10
        while time.monotonic() < end:
            try:
                open_sagas = unfinished(self.sandbox.database_url)
                unsent = unsent_outbox(self.sandbox.database_url)
                depths = infra.queue_totals(self.sandbox.vhost)
                depths = {q: depths.get(q, 0) for q in (REPLIES_QUEUE, *PARTICIPANT_QUEUES)}
                queued = sum(depths.values())
            except Exception as error:  # a service still coming back
                log.warning("drain: %r", error)
                open_sagas = unsent = queued = -1
                depths = {}
            if open_sagas == unsent == queued == 0:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= QUIET_SECONDS:
                    return time.monotonic() - began - QUIET_SECONDS
            else:
                quiet_since = None
            if time.monotonic() >= next_note:
                next_note += 10
                queues = ", ".join(f"{q} {n}" for q, n in depths.items())
                self.out(f"  draining: {open_sagas} sagas open, {unsent} outbox rows unsent, queued: {queues}")
            time.sleep(0.5)
        self.out(f"drain timeout after {self.config.drain_timeout:.0f}s")
        return None

    def _throughput(self, load_ended: float, sagas: dict[str, SagaRow]) -> dict:
        accepted = [order for order in self.orders if order.accepted]
        finished = [s for s in sagas.values() if s.status in TERMINAL]
        completed = [s for s in finished if s.status == "completed"]
        last_accept = max((order.accepted_at for order in accepted), default=load_ended)
        send_seconds = max(last_accept - self.load_started, 1e-6)
        finish_seconds = max(max((s.updated_at for s in finished), default=load_ended) - self.load_started, 1e-6)
        latencies = sorted(s.updated_at - s.created_at for s in finished) or [0.0]
        return {
            "accepted": len(accepted), "send_seconds": send_seconds, "accepted_per_s": len(accepted) / send_seconds,
            "finished": len(finished), "finish_seconds": finish_seconds, "finished_per_s": len(finished) / finish_seconds,
            "completed_per_s": len(completed) / finish_seconds,
            "latency_p50": statistics.median(latencies),
            "latency_p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "latency_max": latencies[-1],
        }


def run_scenario(config: ScenarioConfig, *, out=print) -> ScenarioResult:
    return Scenario(config, out=out).run()
