"""Live progress: after each committed transition a notice goes to the channel layer, where the
admin's websocket consumers forward it to the pages that show the saga.

Notices are gathered for a moment on the process's background event loop and sent as a batch
(the latest state of each saga to its page, one notice to the list), so a busy consumer neither
waits for them nor sends one per transition. A channel layer that is away costs a log line, not
a saga: the pages reload from the database when they reconnect.
"""
import asyncio
import logging
import threading

from channels.layers import get_channel_layer

from sagas.engine import SagaState

log = logging.getLogger(__name__)

ALL_SAGAS_GROUP = "sagas"
BATCH_SECONDS = 0.1


def saga_group(saga_id: str) -> str:
    return f"saga-{saga_id}"


def progress(state: SagaState) -> dict:
    """A notice says only "look again" (sagas/static/sagas/live.js re-fetches the page, which reads
    the record); the saga id routes it to the saga's page."""
    return {"type": "saga.progress", "saga_id": state.saga_id}


class LiveNotices:
    """A process's notices to the live pages (built by sagas.runtime). Its event loop thread
    starts with the first notice, so after any fork."""

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, dict] = {}
        self._lock = threading.Lock()

    def saga_changed(self, state: SagaState) -> None:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="live-progress", daemon=True).start()
            first = not self._pending
            self._pending[state.saga_id] = progress(state)
        if first:
            asyncio.run_coroutine_threadsafe(self._send_batch(), self._loop)

    def stop(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)

    async def _send_batch(self) -> None:
        await asyncio.sleep(BATCH_SECONDS)
        with self._lock:
            batch = list(self._pending.values())
            self._pending.clear()
        layer = get_channel_layer()
        try:
            for message in batch:
                await layer.group_send(saga_group(message["saga_id"]), message)
            await layer.group_send(ALL_SAGAS_GROUP, batch[-1])
        except Exception as error:
            log.warning("live progress not sent: %r", error, extra={"sagas": len(batch)})
