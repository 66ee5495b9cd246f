"""Each saga's live state in Redis (django-redis), written with its version.

A write only lands if it is newer than what Redis holds (a Lua compare), so two writers never
silently overwrite each other and a slow writer never rolls a saga back. The database is
the record of truth: a saga Redis does not have (flushed, restarted) is rebuilt from it, and a
Redis that is down only makes reads slower.
"""
import json
import logging

from django_redis import get_redis_connection
from redis.exceptions import RedisError

from sagas.engine import SagaState, state_from_dict, state_to_dict
from sagas.vocabulary import TERMINAL

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


def key(saga_id: str) -> str:
    return f"orchestrator:saga:{saga_id}"


def read_state(saga_id: str) -> SagaState | None:
    """The state Redis holds, or None if it holds none or cannot be reached."""
    return read_states([saga_id])[0]


def read_states(saga_ids: list[str]) -> list[SagaState | None]:
    """`read_state` for several sagas in one round trip."""
    try:
        pipe = get_redis_connection("default").pipeline(transaction=False)
        for saga_id in saga_ids:
            pipe.hget(key(saga_id), "state")
        raws = pipe.execute()
    except RedisError as error:
        log.warning("redis unavailable for read: %r", error, extra={"sagas": len(saga_ids)})
        return [None] * len(saga_ids)
    return [_decoded(saga_id, raw) for saga_id, raw in zip(saga_ids, raws)]


def _decoded(saga_id: str, raw: bytes | None) -> SagaState | None:
    """A cached state that cannot be read (damaged, or written by an incompatible version) is a
    cache miss: the saga is rebuilt from the record instead of failing every reply for it."""
    if not raw:
        return None
    try:
        return state_from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning("cached state unreadable, rebuilding from the record: %r", error, extra={"saga_id": saga_id})
        return None


def write_state(state: SagaState) -> bool:
    """Store `state` unless Redis already has this version or a newer one."""
    return write_states([state])[0]


def write_states(states: list[SagaState]) -> list[bool]:
    """`write_state` for several sagas in one round trip."""
    try:
        # EVAL, not EVALSHA: Redis caches the script by its text, and a pipeline of EVALSHA would
        # first ask whether the script is loaded, a second round trip each time
        pipe = get_redis_connection("default").pipeline(transaction=False)
        for state in states:
            ttl = FINISHED_TTL if state.status in TERMINAL else LIVE_TTL
            payload = json.dumps(state_to_dict(state), separators=(",", ":"))
            pipe.eval(_WRITE_IF_NEWER, 1, key(state.saga_id), state.version, payload, ttl)
        return [bool(written) for written in pipe.execute()]
    except RedisError as error:
        log.warning("redis unavailable for write: %r", error,
                    extra={"saga_id": states[0].saga_id if len(states) == 1 else None, "sagas": len(states)})
        return [False] * len(states)
