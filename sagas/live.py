"""Live progress: after each committed transition a notice goes to the channel layer, where the
admin's websocket consumers forward it to the pages that show the saga.

Notices are gathered for a moment on one background event loop per process and sent as a batch
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
_loop: asyncio.AbstractEventLoop | None = None
_pending: dict[str, dict] = {}
_lock = threading.Lock()


def saga_group(saga_id: str) -> str:
    return f"saga-{saga_id}"


def progress(state: SagaState) -> dict:
    """A notice says only "look again" (sagas/static/sagas/live.js re-fetches the page, which reads
    the record); the saga id routes it to the saga's page."""
    return {"type": "saga.progress", "saga_id": state.saga_id}


def saga_changed(state: SagaState) -> None:
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="live-progress", daemon=True).start()
        first = not _pending
        _pending[state.saga_id] = progress(state)
    if first:
        asyncio.run_coroutine_threadsafe(_send_batch(), _loop)


async def _send_batch() -> None:
    await asyncio.sleep(BATCH_SECONDS)
    with _lock:
        batch = list(_pending.values())
        _pending.clear()
    layer = get_channel_layer()
    try:
        for message in batch:
            await layer.group_send(saga_group(message["saga_id"]), message)
        await layer.group_send(ALL_SAGAS_GROUP, batch[-1])
    except Exception as error:
        log.warning("live progress not sent: %r", error, extra={"sagas": len(batch)})
