"""Fuzzing the real consume loop on the real broker: rounds of good replies mixed with hostile
bodies and properties. After each round the consumer is alive, every good reply was applied
once, every bad one is in the dead-letter queue with a reason, and saga.replies is empty."""
import collections
import json
import struct
import threading
import time
import uuid

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from sagas.broker import DEAD_LETTER_QUEUE, REPLIES_QUEUE, Broker
from sagas.consumer import TRIES_HEADER
from sagas.models import TimelineEntry
from tests import hostile_bus
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration]

short_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
header_names = short_text.filter(lambda k: len(k.encode()) < 200)
header_values = st.recursive(
    st.one_of(short_text, st.binary(max_size=30), st.integers(-(2**63), 2**63 - 1), st.booleans(), st.none(),
              st.just(hostile_bus.huge_timestamp()),
              # finite only: RabbitMQ refuses a NaN or infinite double (the publisher, not us, gets the error)
              st.floats(allow_nan=False, allow_infinity=False).map(lambda f: hostile_bus.Raw(struct.pack(">cd", b"d", f))),
              st.just(hostile_bus.Raw(b"D\xff\x7f\xff\xff\xff"))),  # RabbitMQ itself refuses unknown field types
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(header_names, inner, max_size=3)),
    max_leaves=8)
tries_values = st.one_of(st.integers(-(2**63), 2**63 - 1), short_text, st.sampled_from(["2.forged", "-1", "1"]))


@st.composite
def properties(draw) -> dict:
    headers = draw(st.one_of(st.none(), st.dictionaries(header_names, header_values, max_size=4)))
    if draw(st.booleans()):
        headers = {**(headers or {}), TRIES_HEADER: draw(tries_values)}
    if draw(st.integers(0, 20)) == 0:
        headers = {**(headers or {}), **{f"big{n}": "x" * 1000 for n in range(100)}}
    junk_id = st.one_of(st.none(), short_text, st.binary(max_size=40), st.just("\x00"))
    return {"headers": headers, "message_id": draw(junk_id), "correlation_id": draw(junk_id)}


@st.composite
def bad_body(draw, saga_ids: list[str]) -> bytes:
    """A body that must be set aside, by construction (not by asking parse_reply)."""
    saga_id = draw(st.sampled_from(saga_ids))
    poison = draw(st.sampled_from([
        {"attempt": 0}, {"attempt": -1}, {"attempt": 2**31}, {"attempt": "1"}, {"attempt": True}, {"attempt": 1.5},
        {"reason": "no\x00pe"}, {"reason": "\ud800"}, {"reason": 42}, {"reason": "r" * 5000},
        {"data": {"total": "NaN"}}, {"data": {"total": "1e999"}}, {"data": {"total": "-1"}}, {"data": {"total": 10**20}},
        {"data": {"total": "1.00", "note": "\x00"}}, {"data": [1]}, {"command": "stock.steal"}, {"command": ["stock.reduce"]},
        {"status": "ok"}, {"saga_id": "x"}, {"saga_id": str(uuid.uuid4())}, {"saga_id": None},
    ]))
    kind = draw(st.sampled_from(["field", "field", "field", "nested", "binary", "big"]))
    if kind == "binary":
        return b"#" + draw(st.binary(max_size=100))
    if kind == "nested":
        depth = draw(st.integers(33, 3000))
        return hostile_bus.good_reply(saga_id)[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "big":
        return hostile_bus.good_reply(saga_id, padding="p" * 70_000)
    text = json.dumps({**json.loads(hostile_bus.good_reply(saga_id)), **poison}, ensure_ascii=False)
    text = text.replace('"total": "NaN"', '"total": NaN').replace('"total": "1e999"', '"total": 1e999')
    return text.encode("utf-8", "surrogatepass")


def test_hostile_rounds_never_stop_the_consumer_and_every_message_ends_applied_or_dead_lettered(
        transactional_db, consumer, settings):
    settings.SAGA_STEP_TIMEOUT_SECONDS = 60  # no resend may race the round's replies
    broker = Broker()
    pushed = collections.Counter()
    started = time.monotonic()

    @hypothesis_settings(max_examples=25, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def round_(data):
        saga_ids = hostile_bus.awaiting_sagas(data.draw(st.integers(1, 4)))
        good = [hostile_bus.Outgoing(hostile_bus.good_reply(s), **data.draw(properties()), fate="applied") for s in saga_ids]
        bad = [hostile_bus.Outgoing(data.draw(bad_body(saga_ids)), **data.draw(properties()))
               for _ in range(data.draw(st.integers(1, 8)))]
        messages = data.draw(st.permutations(good + bad))
        hostile_bus.publish_round(messages)
        pushed.update(m.fate for m in messages)

        dead = []
        wait_for(lambda: dead.extend(broker.drain(DEAD_LETTER_QUEUE)) or len(dead) >= len(bad),
                 timeout=30, what=f"{len(bad)} dead letters")
        applied = wait_for(lambda: _applied_once(saga_ids), timeout=30, what="every good reply applied")
        assert applied == dict.fromkeys(saga_ids, 1)
        assert collections.Counter(d.body for d in dead) == collections.Counter(m.body for m in bad)
        assert all(d.headers.get("x-dead-letter-reason") for d in dead)
        assert hostile_bus.queue_depth(REPLIES_QUEUE) == 0
        assert consumer_thread_alive(consumer)

    round_()
    time.sleep(0.5)
    assert broker.drain(DEAD_LETTER_QUEUE) == []  # nothing was set aside twice
    assert hostile_bus.queue_depth(REPLIES_QUEUE) == 0
    broker.close()
    print(f"consumer fuzz: {sum(pushed.values())} messages pushed ({dict(pushed)}), {time.monotonic() - started:.1f}s")
    assert pushed["applied"] >= 25 and pushed["dead"] >= 25


def _applied_once(saga_ids) -> dict | None:
    counts = collections.Counter(TimelineEntry.objects.filter(saga_id__in=saga_ids, kind="reply", applied=True)
                                 .values_list("saga_id", flat=True))
    counts = {str(saga_id): n for saga_id, n in counts.items()}
    return counts if len(counts) == len(saga_ids) else None


def consumer_thread_alive(consumer) -> bool:
    return any(t.name == "saga-consumer" and t.is_alive() for t in threading.enumerate()) and not consumer.stopping
