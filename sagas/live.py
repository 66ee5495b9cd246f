"""Live progress: after each committed transition a notice goes to the channel layer, where the
admin's websocket consumers forward it to the pages that show the saga.

Sends run on one background event loop per process, so the consumer never waits for them, and
a channel layer that is away costs a log line, not a saga (pages fall back to the database).
"""
import asyncio
import logging
import threading

from channels.layers import get_channel_layer

from sagas.engine import SagaState

log = logging.getLogger(__name__)

ALL_SAGAS_GROUP = "sagas"
_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def saga_group(saga_id: str) -> str:
    return f"saga-{saga_id}"


def _background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="live-progress", daemon=True).start()
        return _loop


def progress(state: SagaState) -> dict:
    return {
        "type": "saga.progress",
        "saga_id": state.saga_id,
        "status": state.status,
        "current_step": state.current_step,
        "version": state.version,
        "steps": [{"name": s.name, "status": s.status, "attempts": s.attempts} for s in state.steps],
        "failure_reason": state.failure_reason,
    }


async def _send(message: dict) -> None:
    layer = get_channel_layer()
    try:
        await layer.group_send(saga_group(message["saga_id"]), message)
        await layer.group_send(ALL_SAGAS_GROUP, message)
    except Exception as error:  # the pages reload from the database on reconnect
        log.warning("live progress not sent: %r", error, extra={"saga_id": message["saga_id"]})


def saga_changed(state: SagaState) -> None:
    asyncio.run_coroutine_threadsafe(_send(progress(state)), _background_loop())
