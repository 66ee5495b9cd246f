"""The admin's live pages listen here: staff who may view sagas. Every socket is in the one group
the notices go to (sagas.live) and passes on those about what its page shows: one saga, or the list.

A socket lives no longer than the login that opened it: logging out closes it at once (each
socket joins a group named after its session, which the logout signal tells), and before passing
on a notice the socket checks again, at most every RECHECK_SECONDS, that its session still holds
a user who may view sagas (an expired session, a revoked permission, a deactivated account).
"""
import hashlib
import logging
import time
from importlib import import_module
from types import SimpleNamespace

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user, user_logged_out
from django.dispatch import receiver

from sagas.live import ALL_SAGAS_GROUP

log = logging.getLogger(__name__)

VIEW_PERMISSION = "sagas.view_saga"
FORBIDDEN = 4403  # sagas/static/sagas/live.js stops reconnecting on this code
RECHECK_SECONDS = 5.0


def session_group(session_key: str) -> str:
    # a digest: the session key is a credential and group names end up in Redis keys
    return "session-" + hashlib.sha256(session_key.encode()).hexdigest()[:32]


def may_watch(user) -> bool:
    return bool(user is not None and user.is_authenticated and user.is_active and user.is_staff
                and user.has_perm(VIEW_PERMISSION))


def _session_still_may_watch(session_key: str | None) -> bool:
    """Reads the session afresh from its store: gone, expired or logged out is False."""
    if not session_key:
        return False
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    return may_watch(get_user(SimpleNamespace(session=store)))


class SagaProgressSocket(AsyncJsonWebsocketConsumer):
    async def connect(self):
        session = self.scope.get("session")
        self.session_key = session.session_key if session is not None else None
        if not self.session_key or not await database_sync_to_async(may_watch)(self.scope.get("user")):
            await self.close(code=FORBIDDEN)
            return
        saga_id = self.scope["url_route"]["kwargs"].get("saga_id")
        self.saga_id = str(saga_id) if saga_id else None  # None: the list of sagas
        self.joined = [ALL_SAGAS_GROUP, session_group(self.session_key)]
        for group in self.joined:
            await self.channel_layer.group_add(group, self.channel_name)
        self.checked_at = time.monotonic()
        await self.accept()

    async def disconnect(self, code):
        for group in getattr(self, "joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def saga_progress(self, message):
        changed = message.get("saga_ids") or [message.get("saga_id")]  # (the one-saga notice of a process not yet upgraded)
        if self.saga_id is not None and self.saga_id not in changed:
            return
        if time.monotonic() - self.checked_at >= RECHECK_SECONDS:
            if not await database_sync_to_async(_session_still_may_watch)(self.session_key):
                await self.close(code=FORBIDDEN)
                return
            self.checked_at = time.monotonic()
        # the page is told "look again": its saga, or the latest of those that changed
        await self.send_json({"type": "saga.progress", "saga_id": self.saga_id or changed[-1]})

    async def session_ended(self, message):
        await self.close(code=FORBIDDEN)


@receiver(user_logged_out)
def close_the_sessions_sockets(sender, request, user, **kwargs) -> None:
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if not session_key:
        return
    try:
        async_to_sync(get_channel_layer().group_send)(session_group(session_key), {"type": "session.ended"})
    except Exception as error:  # the logout itself must succeed; the re-check closes the socket later
        log.warning("logout not told to the live sockets: %r", error)
