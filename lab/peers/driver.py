"""Running a peer's passes in a process of its own, one pass at a time on the benchmark's word.

The peer process (`serve_passes`) prints {"ready": name} before each pass and waits for a line on
stdin; then it runs the pass and prints {"result": name, ...}. The benchmark (`PeerProcess`)
reads every other process's CPU between "ready" and the result, so each pass is measured alone
(the warm-up is not in the throughput pass's CPU). One JSON object a line on stdout, logs on stderr.
"""
from __future__ import annotations

import json
import selectors
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# one saga: (its own reference, the facts it starts from) -> its terminal status
OneSaga = Callable[[str, dict], str]


@dataclass(frozen=True)
class PassSpec:
    name: str
    count: int
    concurrency: int
    payment_method: str


def run_pass(spec: PassSpec, one_saga: OneSaga, facts: Callable[[str], dict]) -> dict:
    """`spec.count` sagas, `spec.concurrency` clients each keeping one in flight; latency is the
    whole call of one_saga (start to terminal state)."""
    lock = threading.Lock()
    issued, latencies, statuses, errors, spans = [0], [], {}, [], []
    cpu_start = time.process_time()

    def client() -> None:
        while True:
            with lock:
                if issued[0] >= spec.count:
                    return
                issued[0] += 1
            reference = str(uuid.uuid4())
            started = time.perf_counter()
            try:
                status = one_saga(reference, facts(spec.payment_method))
            except Exception as error:  # counted, not retried: the pass goes on
                status = "error"
                with lock:
                    errors.append(f"{reference}: {error!r}"[:300])
            done = time.perf_counter()
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                spans.append((started, done))
                if status == "completed":
                    latencies.append(done - started)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(spec.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = (max(end for _, end in spans) - min(start for start, _ in spans)) if spans else 0.0
    completed = statuses.get("completed", 0)
    return {"sagas": spec.count, "concurrency": spec.concurrency, "completed": completed, "statuses": statuses,
            "seconds": round(seconds, 3), "sagas_per_s": round(completed / seconds, 2) if seconds else 0.0,
            "latencies_ms": [round(x * 1000, 3) for x in latencies], "errors": errors[:10],
            "cpu_seconds": round(time.process_time() - cpu_start, 3)}


def serve_passes(passes: list[PassSpec], one_saga: OneSaga, facts: Callable[[str], dict]) -> None:
    for spec in passes:
        emit({"ready": spec.name})
        if not sys.stdin.readline():
            return  # the benchmark is gone
        emit({"result": spec.name, **run_pass(spec, one_saga, facts)})


def emit(message: dict) -> None:
    print(json.dumps(message), flush=True)


def pass_arguments(parser) -> None:
    parser.add_argument("--sagas", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--single", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=50)


def passes_from(args, *, declined: str, approved: str) -> list[PassSpec]:
    """Warm-up, one saga that must end compensated (the compensations work), throughput, single."""
    return [PassSpec("warmup", args.warmup, args.concurrency, approved), PassSpec("compensation", 1, 1, declined),
            PassSpec("throughput", args.sagas, args.concurrency, approved), PassSpec("single", args.single, 1, approved)]


class PeerProcess:
    """The benchmark's side: starts a peer's driver and runs its passes one by one."""

    def __init__(self, argv: list[str], *, cwd: Path, env: dict, log_path: Path):
        self._log = open(log_path, "ab")
        # unbuffered: a buffered readline could take the next line in too, and select() would then wait for nothing
        self.process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._log, start_new_session=True, bufsize=0)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.process.stdout, selectors.EVENT_READ)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _message(self, deadline: float) -> dict:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                raise TimeoutError(f"peer driver {self.process.args[2:4]} sent nothing in time")
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"peer driver exited ({self.process.wait()}); see {self._log.name}")
            if line.startswith(b"{"):
                return json.loads(line)

    def run(self, name: str, *, timeout: float, before: Callable[[], None] = lambda: None,
            after: Callable[[], None] = lambda: None) -> dict:
        deadline = time.monotonic() + timeout
        ready = self._message(deadline)
        if ready.get("ready") != name:
            raise RuntimeError(f"peer driver is ready for {ready}, not {name!r}")
        before()
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()
        result = self._message(deadline)
        after()
        return result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
