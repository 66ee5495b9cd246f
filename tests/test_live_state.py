"""The live state cache in Redis: versioned writes, and a cached state that cannot be read is a
cache miss, never an error (the saga is rebuilt from the record)."""
import json
import uuid
from dataclasses import replace

from django_redis import get_redis_connection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagas import engine, live_state
from sagas.engine import Limits
from sagas.flows import ORDER_FLOW

FACTS = {"user_id": "u-1", "items": [{"product_id": "sku-1", "quantity": 1}], "currency": "EUR", "payment_method": None}
LIMITS = Limits(step_timeout=1.0, step_max_attempts=2, compensation_max_attempts=2)


def a_state():
    return replace(engine.start(ORDER_FLOW, saga_id=str(uuid.uuid4()), facts=FACTS, limits=LIMITS, now=0.0).state, version=1)


def test_a_newer_version_is_written_and_an_older_one_is_not(fresh_redis):
    state = a_state()
    assert live_state.write_state(replace(state, version=2))
    assert not live_state.write_state(state)  # a slow writer never rolls the saga back
    assert live_state.read_state(state.saga_id).version == 2


def test_a_state_written_by_a_newer_version_with_fields_this_one_lacks_still_loads(fresh_redis):
    state = a_state()
    stored = engine.state_to_dict(state)
    stored["a_field_of_the_future"] = 1
    stored["steps"][0]["another"] = "x"
    stored["awaiting"]["and_one_more"] = True
    get_redis_connection("default").hset(live_state.key(state.saga_id), mapping={"version": 1, "state": json.dumps(stored)})
    assert live_state.read_state(state.saga_id) == state


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(min_size=1, max_size=200),
                     st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                                  lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner,
                                                                                              max_size=3),
                                  max_leaves=8).map(lambda value: json.dumps(value).encode())))
def test_a_damaged_cached_state_is_a_cache_miss(fresh_redis, raw):
    saga_id = str(uuid.uuid4())
    get_redis_connection("default").hset(live_state.key(saga_id), mapping={"version": 1, "state": raw})
    (cached,) = live_state.read_states([saga_id])  # never raises
    assert cached is None or isinstance(cached, engine.SagaState)
