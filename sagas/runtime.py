"""The process-wide objects, built once per process here and passed in.

A `Runtime` holds where a process's committed outbox rows go (its publisher), the thread that
marks them sent, and its notices to the live pages. The web process (and any command that starts
sagas) uses `Runtime.for_web()`, installed by the app at start and read through `current()`; the
consumer builds `Runtime.for_consumer(broker)` and passes it to what it calls. No object here
opens a connection or starts a thread until it is first used, so building one before a fork is
safe. Tests build their own.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from sagas.broker import Broker
from sagas.live import LiveNotices
from sagas.models import OutboxMessage
from sagas.outbox import BackgroundPublisher, DirectPublisher, SentMarker


class Publisher(Protocol):
    def publish(self, rows: list[OutboxMessage]) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class Runtime:
    publisher: Publisher
    sent_marker: SentMarker
    live: LiveNotices
    broker: Broker | None = None  # the consumer's connection (web requests never wait on one)

    @classmethod
    def for_web(cls) -> Runtime:
        """Rows go to a background publisher: a request never waits on the broker."""
        marker = SentMarker()
        return cls(publisher=BackgroundPublisher(marker=marker), sent_marker=marker, live=LiveNotices())

    @classmethod
    def for_consumer(cls, broker: Broker) -> Runtime:
        """Rows go out at once on the consumer's own connection, on its thread."""
        marker = SentMarker()
        return cls(publisher=DirectPublisher(broker, marker=marker), sent_marker=marker, live=LiveNotices(), broker=broker)

    def stop(self) -> None:
        """Publish what was handed over, mark it sent, stop the threads, close the connection."""
        self.publisher.stop()
        self.sent_marker.stop()
        self.live.stop()
        if self.broker is not None:
            self.broker.close()


_installed: Runtime | None = None
_lock = threading.Lock()


def install(runtime: Runtime | None) -> Runtime | None:
    """Make `runtime` the process's (sagas.apps does at start); returns the one it replaces,
    which the caller stops when done with it."""
    global _installed
    with _lock:
        previous, _installed = _installed, runtime
    return previous


def current() -> Runtime:
    """The process's runtime."""
    if _installed is None:
        raise RuntimeError("no runtime installed: sagas.apps installs one at start (sagas.runtime.install)")
    return _installed
