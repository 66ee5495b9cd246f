"""Each saga's live state in Redis (django-redis), written with its version.

A write only lands if it is newer than what Redis holds (a Lua compare), so two writers never
silently overwrite each other and a slow writer never rolls a saga back. The database mirror is
the record of truth: a saga Redis does not have (flushed, restarted) is rebuilt from it, and a
Redis that is down only makes reads slower.
"""
import json
import logging

from django_redis import get_redis_connection
from redis.exceptions import RedisError

from sagas.engine import SagaState, TERMINAL, state_from_dict, state_to_dict

log = logging.getLogger(__name__)

LIVE_TTL = 7 * 24 * 3600
FINISHED_TTL = 24 * 3600

_WRITE_IF_NEWER = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1')
if current >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'state', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
_script = None


def _key(saga_id: str) -> str:
    return f"orchestrator:saga:{saga_id}"


def read_state(saga_id: str) -> SagaState | None:
    """The state Redis holds, or None if it holds none or cannot be reached."""
    try:
        raw = get_redis_connection("default").hget(_key(saga_id), "state")
    except RedisError as error:
        log.warning("redis unavailable for read: %r", error, extra={"saga_id": saga_id})
        return None
    return state_from_dict(json.loads(raw)) if raw else None


def write_state(state: SagaState) -> bool:
    """Store `state` unless Redis already has this version or a newer one."""
    global _script
    try:
        connection = get_redis_connection("default")
        if _script is None:
            _script = connection.register_script(_WRITE_IF_NEWER)
        ttl = FINISHED_TTL if state.status in TERMINAL else LIVE_TTL
        payload = json.dumps(state_to_dict(state), separators=(",", ":"))
        return bool(_script(keys=[_key(state.saga_id)], args=[state.version, payload, ttl], client=connection))
    except RedisError as error:
        log.warning("redis unavailable for write: %r", error, extra={"saga_id": state.saga_id, "version": state.version})
        return False
