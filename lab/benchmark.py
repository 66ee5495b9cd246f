"""Benchmark of the order saga orchestrator against the raw broker, on the real stack.

    python -m lab.benchmark --sagas 2000 --concurrency 16 [--consumers 1] [--rss-growth]

Starts the service as production runs it (lab/stack.py: uvicorn without access log, K saga
consumers, the demo participants and auth service; DJANGO_DEBUG=0, a generated secret key,
PostgreSQL) in a sandbox of its own (lab/sandbox.py: database, Redis db, RabbitMQ vhost), which
it empties first. Then:

1. saga throughput: N normal orders (sku-1) through `POST /orders/create_order`, C clients, each
   keeping one saga in flight (it posts, waits for the saga's terminal event on `saga.events`,
   posts the next). Latency: from the POST being sent to the terminal event being received.
2. one saga in flight: the same with one client (--single sagas), for the p50 at one in flight.
3. the raw broker baseline (lab/raw_chain.py, one process): 3-step command/reply chains
   against the same participants with the same messaging and no state, C in flight and 1 in flight.
4. memory: peak RSS (VmHWM) of the web and consumer processes, consumer RSS after 1,000 sagas
   and, with --rss-growth (20,000 sagas), after 20,000.
5. the peers (lab/peers/, --peers): the same saga on celery-saga over Celery and on DBOS Transact,
   each in a sandbox of its own, after the service's stack is stopped: a warm-up, one saga that
   must end compensated, N sagas at C in flight and --single at one in flight.

The CPU of every process taking part (lab/peers/cpu.py: the service's processes, PostgreSQL,
Redis, RabbitMQ, the load generator; each peer's) is read from /proc around each throughput pass.
With --profile, py-spy samples the web and consumer processes during the throughput pass and
the 25 hottest functions of each go to var/bench/profile-*.top.txt (the samples cost CPU too:
the figures of a profiled run are not the ones to quote).

Prints one table with PASS/MISS per target and one comparing the service with its peers and the
raw chain, and writes the raw numbers to var/bench/result.json. Everything measured runs on this
machine, the benchmark's own clients included.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from demo.catalogue import CUSTOMER_TOKEN
from lab.order_client import OrderClient, Submission
from lab.peers import runner
from lab.peers.cpu import CpuWatch, Group, per_saga_ms, server_groups
from lab.peers.profiling import Profile, summarize
from lab.peers.report import Column, comparison_table, render
from lab.sandbox import DEFAULT_VHOST, Sandbox, SandboxError
from lab.stack import PYTHON, ROOT, Stack

ORDER = {"items": [{"product_id": "sku-1", "quantity": 1}], "currency": "EUR", "payment_method": "pm-123"}
RSS_MILESTONES = (1_000, 20_000)
# issue 11's targets
TARGET_THROUGHPUT_RATIO = 0.30
TARGET_LATENCY_RATIO = 3.5  # and below celery-saga's p50 at one in flight, in the same run
TARGET_SERVICE_CPU_MS = 6.0  # web + consumers, per saga, at C in flight
TARGET_RSS_GROWTH = 10.0  # percent
RAW_WARMUP = 50  # raw_chain.py's default warm-up chains


# --- /proc, no psutil ----------------------------------------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


OTHER_LOAD_MARKERS = ("run_saga_consumer", "run_demo_participants", "orchestration_site.asgi", "pytest",
                      "fault_run", "benchmark.py", "raw_chain.py", "lab.benchmark", "lab.raw_chain")


def other_stack_processes(own: set[int]) -> list[str]:
    """Other people's orchestrator stacks and test runs on this (shared, 2-core) machine."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(marker in argv for marker in OTHER_LOAD_MARKERS) and not argv.startswith("timeout "):
            found.append(f"{entry.name}: {argv[:120]}")
    return found


class LoadWatch:
    """Machine CPU use and other people's stacks during a pass, to judge how noisy it was."""

    def __init__(self, own: set[int]):
        self.own = own
        self.cpu_start = machine_cpu()
        self.others = set(other_stack_processes(own))

    def finish(self) -> dict:
        busy0, total0 = self.cpu_start
        busy1, total1 = machine_cpu()
        self.others |= set(other_stack_processes(self.own))
        return {"machine_cpu_busy_pct": round(100 * (busy1 - busy0) / max(1, total1 - total0), 1),
                "loadavg": open("/proc/loadavg").read().split()[:3], "other_processes": sorted(self.others)}


def wait_for_quiet(max_seconds: float) -> bool:
    """Wait (up to max_seconds) until no other stack or test run is on the machine and the 1-minute
    load is below 1.5: on a shared 2-core machine, others' runs change the numbers a lot."""
    end = time.monotonic() + max_seconds
    while True:
        others = other_stack_processes({os.getpid()})
        load = float(open("/proc/loadavg").read().split()[0])
        if not others and load < 1.5:
            return True
        if time.monotonic() >= end:
            print(f"note: machine still busy after {max_seconds:.0f}s (loadavg {load}, {len(others)} other stack/test "
                  "processes); measuring anyway", flush=True)
            return False
        time.sleep(5)


def service_log_troubles(log_dir: Path) -> dict[str, int]:
    """Warning and error lines per service log: a clean run has none."""
    counts = {}
    for log in sorted(log_dir.glob("*.log")):
        with open(log, errors="replace") as lines:
            counts[log.stem] = sum(1 for line in lines if "level=warning" in line or "level=error" in line)
    return counts


# --- terminal events -----------------------------------------------------------------------------------


class EventListener:
    """Listens to saga.events on a private queue and timestamps each saga's terminal event."""

    def __init__(self, on_count=lambda count: None):
        self._lock = threading.Lock()
        self._terminal: dict[str, tuple[float, str]] = {}
        self._waiters: dict[str, threading.Event] = {}
        self._on_count = on_count
        self._stopping = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name="saga-events", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError(f"event listener did not start: {self._error!r}")

    def stop(self) -> None:
        self._stopping = True
        self._thread.join(5)

    def _run(self) -> None:
        from sagas.broker import EVENTS_EXCHANGE, Broker, BrokerUnavailable

        broker = Broker()
        # The private queue goes with the connection: when the broker connection is lost (the
        # machine's RabbitMQ is shared and may be restarted by others' fault runs), Broker.consume
        # would retry the vanished queue forever, so stop it (it closes the broker, which clears
        # its connection) and bind a new queue. Events published in the gap are lost; their sagas
        # show up as "no terminal event" and the table warns.
        lost = lambda: not broker.connected  # noqa: E731
        try:
            while not self._stopping:
                try:
                    queue_name = broker.bind_temporary_queue(EVENTS_EXCHANGE, "saga.#")
                except BrokerUnavailable:
                    time.sleep(0.5)
                    continue
                self._ready.set()
                broker.consume(queue_name, self._on_event, prefetch=500,
                               should_stop=lambda: self._stopping or lost(), tick_seconds=0.1)
                if not self._stopping:
                    self.reconnects += 1
        except BaseException as error:  # reported by start() or in the results
            self._error = error
            raise
        finally:
            broker.close()

    def _on_event(self, delivery) -> None:
        received = time.perf_counter()
        saga_id = json.loads(delivery.body)["saga_id"]
        status = delivery.routing_key.removeprefix("saga.")
        with self._lock:
            if saga_id in self._terminal:
                return
            self._terminal[saga_id] = (received, status)
            waiter = self._waiters.pop(saga_id, None)
            count = len(self._terminal)
        if waiter:
            waiter.set()
        self._on_count(count)

    def wait(self, saga_id: str, timeout: float) -> tuple[float, str] | None:
        with self._lock:
            if saga_id in self._terminal:
                return self._terminal[saga_id]
            waiter = self._waiters[saga_id] = threading.Event()
        waiter.wait(timeout)
        with self._lock:
            self._waiters.pop(saga_id, None)
            return self._terminal.get(saga_id)


# --- driving sagas over HTTP ---------------------------------------------------------------------------


@dataclass
class PassResult:
    name: str
    sagas: int
    concurrency: int
    latencies: list[float] = field(default_factory=list)  # seconds, completed sagas only
    post_latencies: list[float] = field(default_factory=list)  # seconds from sending the POST to its 202
    saga_ids: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def completed(self) -> int:
        return self.statuses.get("completed", 0)

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        return {"sagas": self.sagas, "concurrency": self.concurrency, "seconds": round(self.seconds, 3),
                "statuses": self.statuses, "completed_per_s": round(self.rate, 2),
                "p50_ms": ms(percentile(self.latencies, 50)), "p99_ms": ms(percentile(self.latencies, 99)),
                "post_p50_ms": ms(percentile(self.post_latencies, 50)), "errors": len(self.errors),
                "first_errors": self.errors[:5]}


def drive_sagas(name: str, base_url: str, listener: EventListener, *, count: int, concurrency: int,
                saga_timeout: float) -> PassResult:
    result = PassResult(name, count, concurrency)
    # no Idempotency-Key: each POST is sent once (an error is counted, not retried), as before the lab had one client
    orders = OrderClient(base_url, timeout=(30.0, 30.0))
    lock, issued, first_sent, last_done = threading.Lock(), [0], [None], [0.0]

    def client() -> None:
        while True:
            with lock:
                if issued[0] >= count:
                    return
                issued[0] += 1
            order = orders.submit(Submission(body=ORDER))
            with lock:
                first_sent[0] = min(first_sent[0] or order.sent, order.sent)
            if not order.accepted:
                with lock:
                    result.errors.append(f"POST failed: {dict(order.problems)}")
                continue
            with lock:
                result.post_latencies.append(order.answered - order.sent)
                result.saga_ids.append(order.saga_id)
            outcome = listener.wait(order.saga_id, saga_timeout)
            with lock:
                if outcome is None:
                    result.statuses["no terminal event"] = result.statuses.get("no terminal event", 0) + 1
                    result.errors.append(f"saga {order.saga_id}: no terminal event within {saga_timeout}s")
                    continue
                done, status = outcome
                result.statuses[status] = result.statuses.get(status, 0) + 1
                last_done[0] = max(last_done[0], done)
                if status == "completed":
                    result.latencies.append(done - order.sent)

    threads = [threading.Thread(target=client, name=f"client-{n}", daemon=True) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = max(0.0, last_done[0] - (first_sent[0] or last_done[0]))
    return result


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def step_times(saga_ids: list[str]) -> dict[str, float | None]:
    """Median ms from sending each forward command to applying its reply (the timeline's duration_ms)."""
    from sagas.models import TimelineEntry

    durations: dict[str, list[float]] = {}
    rows = TimelineEntry.objects.filter(saga_id__in=saga_ids, kind=TimelineEntry.Kind.REPLY, applied=True)
    for command, duration in rows.values_list("command", "duration_ms"):
        if duration is not None:
            durations.setdefault(command, []).append(duration / 1000)
    return {command: ms(percentile(values, 50)) for command, values in sorted(durations.items())}


def web_floor(stack: Stack, base_url: str, saga_id: str, *, requests: int, concurrency: int) -> dict[str, float]:
    """The web process's CPU per request for requests that do no saga work, at `concurrency`:
    `GET /` (uvicorn, Django's middleware and a DRF view, nothing else) and `GET /sagas/<id>` (the
    same plus the bearer token's auth call and one read). What a POST costs beyond them is the
    order's own work."""
    floor = {}
    token = {"Authorization": f"Bearer {CUSTOMER_TOKEN}"}
    for name, path, headers in (("liveness", "/", {}), ("status read", f"/sagas/{saga_id}", token)):
        watch = CpuWatch([Group("web", roots=(stack.services["web"].pid,))])
        watch.start()
        get_many(base_url + path, headers, count=requests, concurrency=concurrency)
        floor[name] = round(watch.stop()["web"] * 1000 / requests, 2)
    return floor


def get_many(url: str, headers: dict, *, count: int, concurrency: int) -> None:
    """`count` GETs of `url` from `concurrency` clients; raises if one is not a 200."""
    import requests as http

    issued, failures, lock = [0], [], threading.Lock()

    def client() -> None:
        session = http.Session()
        while not failures:
            with lock:
                if issued[0] >= count:
                    return
                issued[0] += 1
            answer = session.get(url, headers=headers, timeout=30)
            if answer.status_code != 200:
                failures.append(f"GET {url}: {answer.status_code} {answer.text[:200]}")

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(failures[0])


# --- the raw broker baseline ---------------------------------------------------------------------------


def run_raw_chains(stack: Stack, *, chains: int, concurrency: int, single: int, timeout: float) -> dict:
    argv = [PYTHON, "-m", "lab.raw_chain", "--chains", str(chains), "--concurrency", str(concurrency),
            "--single", str(single), "--warmup", str(RAW_WARMUP), "--timeout", str(timeout)]
    done = subprocess.run(argv, cwd=ROOT, env=stack.env, capture_output=True, text=True)
    (stack.log_dir / "raw_chain.log").write_text(done.stderr)
    if done.returncode:
        raise RuntimeError(f"raw chain baseline failed ({done.returncode}): {done.stderr[-2000:]}")
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("throughput", "single"):
        if key in results:
            latencies = [x / 1000 for x in results[key].pop("latencies_ms")]
            results[key]["p50_ms"] = ms(percentile(latencies, 50))
            results[key]["p99_ms"] = ms(percentile(latencies, 99))
    return results


# --- the run -------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the saga orchestrator against the raw broker.")
    parser.add_argument("--sagas", type=int, default=2000, help="sagas in the throughput pass")
    parser.add_argument("--concurrency", type=int, default=16, help="clients, each with one saga in flight")
    parser.add_argument("--consumers", type=int, default=1, help="saga consumer processes")
    parser.add_argument("--single", type=int, default=200, help="sagas (and raw chains) at one in flight")
    parser.add_argument("--raw-chains", type=int, help="raw chains in the throughput pass (default: min(sagas, 5000))")
    parser.add_argument("--warmup", type=int, default=50, help="sagas before measuring (counted for RSS, not reported)")
    parser.add_argument("--floor-requests", type=int, default=1000,
                        help="requests of each kind in the web floor pass (GET / and GET /sagas/<id>)")
    parser.add_argument("--rss-growth", action="store_true", help="run at least 20,000 sagas and report consumer "
                                                                   "RSS growth from 1,000 to 20,000")
    parser.add_argument("--saga-timeout", type=float, default=120.0, help="seconds a saga may take to end")
    parser.add_argument("--web-port", type=int, default=7101)
    parser.add_argument("--auth-port", type=int, default=5306)
    parser.add_argument("--database", default="bench_orchestrator", help="PostgreSQL database (dropped and made again)")
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--pg-user", default="postgres")
    parser.add_argument("--redis-db", type=int, default=6, help="Redis db (flushed)")
    parser.add_argument("--vhost", default="bench",
                        help=f"RabbitMQ vhost (deleted and made again; {DEFAULT_VHOST!r}: the default one, used as it is)")
    parser.add_argument("--log-level", default="INFO", help="LOG_LEVEL of the service processes (production: INFO)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="first wait up to this long for other stacks/test runs to finish and the load to drop")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "bench", help="logs, ledger and result.json")
    parser.add_argument("--peers", default=",".join(runner.PEERS),
                        help=f"peers to run after the service, comma-separated ({', '.join(runner.PEERS)}; '' for none)")
    parser.add_argument("--peer-redis-db", type=int, default=12,
                        help="Redis db of the peers (flushed); their database is <database>_peers, their vhost <vhost>-peers")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the web and consumer processes during the throughput pass (var/bench/profile-*)")
    args = parser.parse_args()
    if args.rss_growth:
        args.sagas = max(args.sagas, RSS_MILESTONES[-1] - args.warmup)
    if args.raw_chains is None:
        args.raw_chains = min(args.sagas, 5000)
    args.peers = [name for name in args.peers.split(",") if name]
    unknown = set(args.peers) - set(runner.PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; known: {', '.join(runner.PEERS)}")
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the stack is stopped on the way out
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else None
    sandbox = Sandbox(database=args.database, vhost=args.vhost, redis_db=args.redis_db,
                      postgres_admin_url=f"postgres://{args.pg_user}@{args.pg_host}:{args.pg_port}/postgres",
                      redis_host=os.environ.get("REDIS_HOST", "127.0.0.1"),
                      redis_port=int(os.environ.get("REDIS_PORT", 6379)))
    peer_sandbox = Sandbox(database=f"{args.database}_peers", redis_db=args.peer_redis_db,
                           vhost=args.vhost if args.vhost == DEFAULT_VHOST else f"{args.vhost}-peers",
                           postgres_admin_url=sandbox.postgres_admin_url, redis_host=sandbox.redis_host,
                           redis_port=sandbox.redis_port)
    try:
        sandbox.create()
        if args.peers:
            peer_sandbox.create()
    except SandboxError as error:
        sys.exit(f"benchmark: {error}")
    vhost = sandbox.vhost
    ledger = args.out / "ledger.sqlite3"
    for stale in args.out.glob("*ledger.sqlite3*"):  # the peers' ledgers too
        stale.unlink()
    log_dir = args.out / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)

    stack = Stack.create(
        log_dir=log_dir, web_port=args.web_port, auth_port=args.auth_port, ledger=ledger,
        DJANGO_DEBUG="0", DJANGO_SECRET_KEY=f"bench-{uuid.uuid4().hex}{uuid.uuid4().hex}", LOG_LEVEL=args.log_level,
        **sandbox.environment(),
    )
    migrated = stack.manage("migrate", "--no-input", check=False)
    if migrated.returncode:
        sys.exit(f"migrate failed:\n{migrated.stdout}\n{migrated.stderr}")
    os.environ.update(stack.env)  # the listener's Broker reads the same settings as the service
    import django

    django.setup()

    consumers = [f"consumer-{n}" for n in range(1, args.consumers + 1)]
    samples: dict[int, dict] = {}

    def sample_at(count: int) -> None:
        if count in RSS_MILESTONES:
            samples[count] = {name: memory_kib(stack.services[name].pid)["VmRSS"] for name in consumers}

    listener = EventListener(on_count=sample_at)
    base_url = f"http://127.0.0.1:{args.web_port}"
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "vhost": vhost, "quiet_at_start": quiet}
    try:
        stack.start_participants()
        for number in range(1, args.consumers + 1):
            stack.start_consumer(number)
        stack.start_web(access_log=False)
        stack.wait_auth()
        stack.wait_web()
        listener.start()
        print(f"stack up: web {base_url}, {args.consumers} consumer(s), logs in {log_dir}", flush=True)

        if args.warmup:
            drive_sagas("warmup", base_url, listener, count=args.warmup, concurrency=args.concurrency,
                        saga_timeout=args.saga_timeout)
        own = {os.getpid(), *(service.pid for service in stack.services.values())}
        cpu_watch = CpuWatch([*(Group(name, roots=(service.pid,)) for name, service in stack.services.items()),
                              Group("load generator", roots=(os.getpid(),), descendants=False),
                              *server_groups([args.database])])
        profiles = [Profile(pid=stack.services[name].pid, name=name, out_dir=args.out)
                    for name in ["web", *consumers]] if args.profile else []
        watch = LoadWatch(own)
        cpu_watch.start()
        started = time.monotonic()
        print(f"saga throughput pass: {args.sagas} sagas, {args.concurrency} in flight ...", flush=True)
        throughput = drive_sagas("throughput", base_url, listener, count=args.sagas, concurrency=args.concurrency,
                                 saga_timeout=args.saga_timeout)
        wall = time.monotonic() - started
        results["cpu_seconds_in_throughput_pass"] = {**cpu_watch.stop(), "wall": round(wall, 2)}
        results["profiles"] = [str(summarize(path, profile.name, args.out))
                               for profile in profiles if (path := profile.stop())]
        results["load"] = {"throughput": watch.finish()}
        print(f"single pass: {args.single} sagas, 1 in flight ...", flush=True)
        watch = LoadWatch(own)
        single = drive_sagas("single", base_url, listener, count=args.single, concurrency=1,
                             saga_timeout=args.saga_timeout)
        results["load"]["single"] = watch.finish()
        results["single_step_ms"] = step_times(single.saga_ids)
        print(f"web floor: {args.floor_requests} requests of GET / and of GET /sagas/<id>, {args.concurrency} in "
              "flight ...", flush=True)
        results["web_floor_cpu_ms"] = web_floor(stack, base_url, single.saga_ids[0], requests=args.floor_requests,
                                                concurrency=args.concurrency) if single.saga_ids else {}
        memory = {name: memory_kib(stack.services[name].pid) for name in ["web", *consumers]}

        print(f"raw broker baseline: {args.raw_chains} chains at {args.concurrency}, {args.single} at 1 ...",
              flush=True)
        watch = LoadWatch(own)
        # the raw chains run their three passes in one process: its other processes' CPU is over all of them
        raw_watch = CpuWatch([Group("participants", roots=(stack.services["participants"].pid,)),
                              *server_groups([args.database])])
        raw_watch.start()
        raw = run_raw_chains(stack, chains=args.raw_chains, concurrency=args.concurrency, single=args.single,
                             timeout=max(1200.0, args.saga_timeout))
        raw["cpu_seconds_in_all_passes"] = raw_watch.stop()
        results["load"]["raw"] = watch.finish()
        raw_chains_run = RAW_WARMUP + args.raw_chains + args.single
        raw["participants_cpu_ms_per_chain"] = round(
            raw["cpu_seconds_in_all_passes"]["participants"] * 1000 / raw_chains_run, 2)
        dead = [name for name, service in stack.services.items() if not service.alive()]
    finally:
        listener.stop()
        stack.stop_all()

    peers = {}
    peer_env = {**stack.env, **runner.peer_environment(peer_sandbox, rabbitmq_host=os.environ.get(
        "RABBITMQ_HOST", "127.0.0.1"), ledger_dir=args.out)}
    for name in args.peers:
        print(f"peer {name}: {args.warmup} warm-up, 1 compensated, {args.sagas} at {args.concurrency}, "
              f"{args.single} at 1 ...", flush=True)
        watch = LoadWatch(own)
        try:
            peers[name] = runner.run_peer(name, env=peer_env, log_dir=log_dir, sagas=args.sagas,
                                          concurrency=args.concurrency, single=args.single, warmup=args.warmup,
                                          log_level=args.log_level, timeout=max(1200.0, args.saga_timeout),
                                          databases=[peer_sandbox.database])
        except (RuntimeError, TimeoutError, OSError) as error:
            peers[name] = {"error": str(error)}
            print(f"WARNING: peer {name} failed: {error}", flush=True)
        results["load"][name] = watch.finish()

    results.update({"listener_reconnects": listener.reconnects, "throughput": throughput.summary(),
                    "single": single.summary(), "raw": raw, "memory_kib": memory, "consumer_rss_kib_at": samples,
                    "stopped_early": dead, "peers": peers})
    verdicts = print_table(args, throughput, single, raw, memory, samples, consumers,
                           results["cpu_seconds_in_throughput_pass"], results["single_step_ms"], peers,
                           results.get("web_floor_cpu_ms", {}))
    results["verdicts"] = verdicts
    columns = comparison_columns(args, throughput, single, raw, results["cpu_seconds_in_throughput_pass"], peers)
    print(comparison_table(columns, args.concurrency))
    print()
    for path in results["profiles"]:
        print(f"profile: {path}")
    for name, peer in peers.items():
        statuses = peer.get("compensation", {}).get("statuses")
        if statuses != {"compensated": 1}:
            print(f"WARNING: peer {name}: the declined-payment saga did not end compensated: {statuses or peer}")
    if dead:
        print(f"WARNING: these processes died during the run: {dead}; see {log_dir}")
    if listener.reconnects or any(raw.get(key, {}).get("broker_lost") for key in ("throughput", "single")):
        print("WARNING: the benchmark's RabbitMQ connection was lost during the run (a broker restart by another run?);"
              " the numbers include that outage")
    troubles = service_log_troubles(log_dir)
    results["service_log_warnings"] = troubles
    if any(troubles.values()):
        print(f"WARNING: warnings/errors in the service logs (outages of PostgreSQL/RabbitMQ/Redis?): {troubles}; "
              f"the numbers include them, see {log_dir}")
    for name, load in results["load"].items():
        print(f"load during {name} pass: machine CPU {load['machine_cpu_busy_pct']}% busy, "
              f"loadavg {' '.join(load['loadavg'])}")
        if load["other_processes"]:
            print(f"WARNING: {len(load['other_processes'])} other stack/test processes shared the machine during the "
                  f"{name} pass, e.g. {load['other_processes'][:3]}; numbers are pessimistic")
    if throughput.errors or single.errors:
        print(f"WARNING: {len(throughput.errors) + len(single.errors)} saga errors, e.g. "
              f"{(throughput.errors + single.errors)[:3]}")
    out = args.out / "result.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"raw numbers: {out}")
    valid = not dead and not listener.reconnects and not throughput.errors and raw["throughput"]["completed"]
    return 0 if valid and all(v != "MISS" for v in verdicts.values()) else 1


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.1f} MiB"


def _verdict(value: float | None, ok) -> str:
    return "n/a" if value is None else ("PASS" if ok(value) else "MISS")


def print_table(args, throughput: PassResult, single: PassResult, raw: dict, memory: dict, samples: dict,
                consumers: list[str], cpu_in_pass: dict[str, float], step_ms: dict, peers: dict,
                floor: dict[str, float]) -> dict[str, str]:
    raw.setdefault("single", {"p50_ms": None, "p99_ms": None, "completed": 0})
    raw_c, raw_1 = raw["throughput"], raw["single"]
    saga_p50, saga_p99 = ms(percentile(throughput.latencies, 50)), ms(percentile(throughput.latencies, 99))
    single_p50, single_p99 = ms(percentile(single.latencies, 50)), ms(percentile(single.latencies, 99))
    throughput_ratio = throughput.rate / raw_c["chains_per_s"] if raw_c["chains_per_s"] else None
    latency_ratio = single_p50 / raw_1["p50_ms"] if single_p50 and raw_1["p50_ms"] else None
    first, last = RSS_MILESTONES[0], RSS_MILESTONES[-1]
    growth = None
    if first in samples and last in samples:
        growth = max((samples[last][c] - samples[first][c]) * 100 / samples[first][c] for c in consumers)
    celery_single = peers.get("celery-saga", {}).get("single", {}).get("latencies_ms")
    celery_p50 = percentile(celery_single, 50) if celery_single else None
    per_saga = {name: seconds * 1000 / max(1, throughput.sagas) for name, seconds in cpu_in_pass.items()
                if name != "wall"}
    consumers_cpu = sum(value for name, value in per_saga.items() if name.startswith("consumer"))
    service_cpu = per_saga["web"] + consumers_cpu
    verdicts = {
        "throughput ratio": _verdict(throughput_ratio, lambda r: r >= TARGET_THROUGHPUT_RATIO),
        "latency ratio": _verdict(latency_ratio, lambda r: r <= TARGET_LATENCY_RATIO),
        "latency against celery-saga": _verdict(single_p50 if celery_p50 else None, lambda p: p < celery_p50),
        "service cpu": _verdict(service_cpu, lambda c: c <= TARGET_SERVICE_CPU_MS),
        "rss growth": _verdict(growth, lambda g: g < TARGET_RSS_GROWTH),
    }
    driver_cpu = raw_c["cpu_seconds"] * 1000 / max(1, raw_c["completed"])
    raw_participants_cpu = raw["participants_cpu_ms_per_chain"]
    at_first, at_last = samples.get(first), samples.get(last)
    plural = "s (max)" if len(consumers) > 1 else ""
    rows = [
        ("saga throughput", f"{_fmt(throughput.rate, ' sagas/s')} ({throughput.completed}/{throughput.sagas} "
                            f"completed, C={throughput.concurrency}, K={args.consumers})", "", ""),
        ("raw chain rate", f"{_fmt(raw_c['chains_per_s'], ' chains/s')} ({raw_c['completed']}/{raw_c['chains']}, "
                           f"C={args.concurrency})", "", ""),
        ("throughput ratio saga/raw", _fmt(throughput_ratio, "", 2), f">= {TARGET_THROUGHPUT_RATIO}",
         verdicts["throughput ratio"]),
        ("saga latency p50 / p99", f"{_fmt(saga_p50, ' ms')} / {_fmt(saga_p99, ' ms')} (C={throughput.concurrency})",
         "", ""),
        ("raw chain latency p50 / p99", f"{_fmt(raw_c['p50_ms'], ' ms')} / {_fmt(raw_c['p99_ms'], ' ms')} "
                                        f"(C={args.concurrency})", "", ""),
        ("saga p50, 1 in flight", f"{_fmt(single_p50, ' ms')} (p99 {_fmt(single_p99, ' ms')}, n={single.completed})",
         "", ""),
        ("  of which POST -> 202 (p50)", _fmt(ms(percentile(single.post_latencies, 50)), " ms"), "", ""),
        ("  command sent -> reply applied (p50)", ", ".join(f"{k} {v:.1f} ms" for k, v in step_ms.items()), "", ""),
        ("raw chain p50, 1 in flight", f"{_fmt(raw_1['p50_ms'], ' ms')} (p99 {_fmt(raw_1['p99_ms'], ' ms')}, "
                                       f"n={raw_1['completed']})", "", ""),
        ("latency ratio saga/raw (1 in flight)", _fmt(latency_ratio, "", 2), f"<= {TARGET_LATENCY_RATIO}",
         verdicts["latency ratio"]),
        ("celery-saga p50, 1 in flight", _fmt(celery_p50, " ms"), "saga p50 below",
         verdicts["latency against celery-saga"]),
        ("CPU per saga, web + consumers (C pass)", f"{service_cpu:.1f} ms = web {per_saga['web']:.1f} + consumers "
                                                   f"{consumers_cpu:.1f} (all processes: table below)",
         f"<= {TARGET_SERVICE_CPU_MS}", verdicts["service cpu"]),
        ("  web CPU per request without saga work", "; ".join(
            f"{name} {value:.1f} ms" for name, value in floor.items()) or "n/a", "", ""),
        ("CPU per raw chain (C pass)", f"{driver_cpu + raw_participants_cpu:.1f} ms = driver {driver_cpu:.1f} + "
                                       f"participants {raw_participants_cpu:.1f} (+ RabbitMQ)", "", ""),
        ("peak RSS web", _mib(memory["web"]["VmHWM"]), "", ""),
        (f"peak RSS consumer{plural}", _mib(max(memory[c]["VmHWM"] for c in consumers)), "", ""),
        (f"consumer{plural} RSS after {first:,} sagas", _mib(max(at_first.values())) if at_first else
         "n/a (fewer sagas)", "", ""),
        (f"consumer{plural} RSS after {last:,} sagas", _mib(max(at_last.values())) if at_last else
         "n/a (no --rss-growth)", "", ""),
        (f"consumer RSS growth {first // 1000}k -> {last // 1000}k", _fmt(growth, " %", 2),
         f"< {TARGET_RSS_GROWTH:g} %", verdicts["rss growth"]),
    ]
    print()
    print(render(("metric", "value", "target", "verdict"), rows))
    print()
    return verdicts


def comparison_columns(args, throughput: PassResult, single: PassResult, raw: dict, cpu_in_pass: dict,
                       peers: dict) -> list[Column]:
    """The service, each peer that ran and the raw chain, as columns of the comparison table."""

    def latency(values_ms: list[float] | None, pct: float) -> float | None:
        return percentile(values_ms, pct) if values_ms else None

    ours = Column("orchestrator", throughput.rate, ms(percentile(throughput.latencies, 50)),
                  ms(percentile(throughput.latencies, 99)), ms(percentile(single.latencies, 50)),
                  ms(percentile(single.latencies, 99)),
                  per_saga_ms({k: v for k, v in cpu_in_pass.items() if k != "wall"}, throughput.completed),
                  note="the load generator is the benchmark itself: HTTP clients and the saga.events listener")
    columns = [ours]
    for name, peer in peers.items():
        if "error" in peer:
            columns.append(Column(name, None, None, None, None, None, note=f"failed: {peer['error'][:200]}"))
            continue
        c, one = peer["throughput"], peer["single"]
        columns.append(Column(name, c["sagas_per_s"], latency(c["latencies_ms"], 50), latency(c["latencies_ms"], 99),
                              latency(one["latencies_ms"], 50), latency(one["latencies_ms"], 99),
                              peer["cpu_ms_per_saga"]))
    raw_c, raw_1 = raw["throughput"], raw.get("single", {})
    chains_run = RAW_WARMUP + args.raw_chains + args.single
    raw_cpu = {"raw chain driver": round(raw_c["cpu_seconds"] * 1000 / max(1, raw_c["completed"]), 2),
               **per_saga_ms(raw.get("cpu_seconds_in_all_passes", {}), chains_run)}
    columns.append(Column("raw chain", raw_c["chains_per_s"], raw_c["p50_ms"], raw_c["p99_ms"], raw_1.get("p50_ms"),
                          raw_1.get("p99_ms"), raw_cpu,
                          note="CPU of its participants and servers over all its passes (warm-up and 1 in flight too)"))
    return columns

if __name__ == "__main__":
    sys.exit(main())
