"""Readiness of the web process (`GET /readyz`) and liveness of a consumer (its heartbeat).

`GET /` stays the plain liveness answer. `/readyz` asks the database, Redis and RabbitMQ at once
and answers 503 naming those that failed or did not answer within READINESS_TIMEOUT_SECONDS.

A consumer's loop beats a heartbeat each time it turns: a file (CONSUMER_HEARTBEAT_FILE, for a
probe in the same container) and a Redis key per consumer name (for a probe on another host).
`manage.py consumer_health` reads one of them and fails when the beat is older than
CONSUMER_HEARTBEAT_MAX_AGE_SECONDS.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import connections
from django.http import JsonResponse
from django_redis import get_redis_connection

from sagas import metrics
from sagas.broker import Broker

log = logging.getLogger(__name__)

HEARTBEAT_REDIS_PREFIX = "orchestrator:consumer-heartbeat:"
FILE_BEAT_SECONDS = 1.0
REDIS_BEAT_SECONDS = 5.0


def _database() -> None:
    try:
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        connections.close_all()  # this thread's connection goes back to the pool


def _redis() -> None:
    get_redis_connection("default").ping()


def _broker() -> None:
    broker = Broker(heartbeat=0)
    try:
        broker.connect()
    finally:
        broker.close()


CHECKS = {"database": _database, "redis": _redis, "broker": _broker}
# a few threads of our own: a hung dependency holds one until its own timeout, never a request thread
_pool = ThreadPoolExecutor(max_workers=6, thread_name_prefix="readyz")


def readiness(*, timeout: float | None = None) -> dict[str, str]:
    """{check: "ok" or why not}, each check given `timeout` seconds, all of them at once."""
    timeout = settings.READINESS_TIMEOUT_SECONDS if timeout is None else timeout
    deadline = time.monotonic() + timeout
    futures = {name: _pool.submit(check) for name, check in CHECKS.items()}
    results = {}
    for name, future in futures.items():
        try:
            future.result(timeout=max(0.0, deadline - time.monotonic()))
            results[name] = "ok"
        except FutureTimeout:
            results[name] = f"no answer within {timeout:g}s"
        except Exception as error:
            log.warning("readiness check failed", extra={"check": name, "error": repr(error)})
            results[name] = f"failed ({type(error).__name__})"
    return results


_last_answer: tuple[float, dict[str, str]] | None = None
_answering = threading.Lock()


def shared_readiness() -> dict[str, str]:
    """`readiness`, asked at most once every READINESS_CACHE_SECONDS whatever the request rate:
    callers meanwhile share the last answer (or wait for the one being made), so /readyz, open to
    anyone, cannot be used to hammer the database, Redis and the broker with connections."""
    global _last_answer
    with _answering:
        if _last_answer is not None and time.monotonic() - _last_answer[0] < settings.READINESS_CACHE_SECONDS:
            return _last_answer[1]
        checks = readiness()
        _last_answer = (time.monotonic(), checks)
        return checks


def readyz(request):
    if request.method != "GET":
        return JsonResponse({"detail": f'Method "{request.method}" not allowed.'}, status=405)
    checks = shared_readiness()
    failed = [name for name, result in checks.items() if result != "ok"]
    if failed:
        return JsonResponse({"status": "unavailable", "detail": f"not ready: {', '.join(failed)}", "checks": checks},
                            status=503)
    return JsonResponse({"status": "ready", "checks": checks})


class Heartbeat:
    """Written by the consumer's loop each time it turns (at most every second to the file, every
    five seconds to Redis). Failing to write is logged, never raised: the loop goes on."""

    def __init__(self, *, name: str, path: str | None, use_redis: bool = True):
        self.name = name
        self.path = Path(path) if path else None
        self.use_redis = use_redis
        self._next_file = self._next_redis = 0.0
        self._warned = False

    def beat(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        metrics.loop_turned(now)
        clock = time.monotonic()
        if self.path is not None and clock >= self._next_file:
            self._next_file = clock + FILE_BEAT_SECONDS
            self._write_file(now)
        if self.use_redis and clock >= self._next_redis:
            self._next_redis = clock + REDIS_BEAT_SECONDS
            self._write_redis(now)

    def _write_file(self, now: float) -> None:
        try:
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(f"{now:.3f}\n")
            os.replace(temporary, self.path)  # a reader never sees half a number
        except OSError as error:
            self._warn(f"heartbeat file {self.path} not written: {error!r}")

    def _write_redis(self, now: float) -> None:
        try:
            ttl = max(60, int(settings.CONSUMER_HEARTBEAT_MAX_AGE_SECONDS * 10))
            get_redis_connection("default").set(HEARTBEAT_REDIS_PREFIX + self.name, f"{now:.3f}", ex=ttl)
        except Exception as error:  # Redis away: the file still beats
            self._warn(f"heartbeat not written to Redis: {error!r}")

    def _warn(self, text: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(text, extra={"consumer": self.name})


_heartbeat: Heartbeat | None = None
_heartbeat_lock = threading.Lock()


def install_heartbeat(heartbeat: Heartbeat | None) -> None:
    """Make `heartbeat` the one `loop_turned` beats (the consumer command builds it)."""
    global _heartbeat
    with _heartbeat_lock:
        _heartbeat = heartbeat


def loop_turned() -> None:
    """Hook: the consumer's tick (it runs each time the loop turns, idle or busy)."""
    heartbeat = _heartbeat
    if heartbeat is None:
        metrics.loop_turned()
    else:
        heartbeat.beat()


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    message: str


def judge_heartbeat(*, name: str, source: str, path: str | None, max_age: float, now: float | None = None) -> Verdict:
    """Whether the consumer `name` beat within `max_age` seconds, read from its file or Redis."""
    now = time.time() if now is None else now
    if source == "file":
        where = f"heartbeat file {path}"
        try:
            raw = Path(path).read_text()
        except FileNotFoundError:
            return Verdict(False, f"consumer {name}: no {where} (not started, or it never turned)")
        except OSError as error:
            return Verdict(False, f"consumer {name}: cannot read {where}: {error}")
    else:
        where = f"Redis key {HEARTBEAT_REDIS_PREFIX}{name}"
        try:
            value = get_redis_connection("default").get(HEARTBEAT_REDIS_PREFIX + name)
        except Exception as error:
            return Verdict(False, f"consumer {name}: cannot read {where}: {error!r}")
        if value is None:
            return Verdict(False, f"consumer {name}: no {where} (not started, or silent for long)")
        raw = value.decode(errors="replace")
    try:
        beat = float(raw.strip())
    except ValueError:
        return Verdict(False, f"consumer {name}: {where} holds {raw[:40]!r}, not a time")
    age = now - beat
    if age > max_age:
        return Verdict(False, f"consumer {name}: loop last turned {age:.0f}s ago (limit {max_age:g}s, {where})")
    return Verdict(True, f"consumer {name}: loop turned {max(age, 0):.1f}s ago")


def consumer_started(*, metrics_port: int | None = None):
    """What a consumer process sets up before its loop: its heartbeat, its metrics' process label
    and, with a port (argument, else CONSUMER_METRICS_PORT; 0: none), its metrics server on
    CONSUMER_METRICS_HOST. Returns the server, or None."""
    metrics.set_process("consumer")
    install_heartbeat(Heartbeat(name=settings.CONSUMER_NAME, path=settings.CONSUMER_HEARTBEAT_FILE))
    port = settings.CONSUMER_METRICS_PORT if metrics_port is None else metrics_port
    return metrics.serve(port=port, host=settings.CONSUMER_METRICS_HOST) if port else None
