"""Live progress: after each committed transition a notice goes to the channel layer, where the
admin's websocket consumers forward it to the pages that show the saga.

Notices are gathered for a moment on the process's background event loop and sent as one
message naming the sagas that changed, to the one group every live page's socket is in (each
socket passes on what its page shows: sagas.live_socket), so a busy consumer neither waits for
them nor sends one per transition. A channel layer that is away costs a log line, not
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


def progress(saga_ids: list[str]) -> dict:
    """A notice says only "look again" (sagas/static/sagas/live.js re-fetches the page, which reads
    the record); the saga ids tell each page whether it shows one of them."""
    return {"type": "saga.progress", "saga_ids": saga_ids}


class LiveNotices:
    """A process's notices to the live pages (built by sagas.runtime). Its event loop thread
    starts with the first notice, so after any fork."""

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, None] = {}  # saga ids, in order
        self._lock = threading.Lock()

    def saga_changed(self, state: SagaState) -> None:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="live-progress", daemon=True).start()
            first = not self._pending
            self._pending[state.saga_id] = None
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
            batch = list(self._pending)
            self._pending.clear()
        try:
            await get_channel_layer().group_send(ALL_SAGAS_GROUP, progress(batch))
        except Exception as error:
            log.warning("live progress not sent: %r", error, extra={"sagas": len(batch)})
