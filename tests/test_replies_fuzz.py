"""Fuzzing parse_reply: whatever the bytes, it raises nothing but PoisonMessage, and whatever it
accepts the database (a timeline entry and a saga row on PostgreSQL) and Redis (JSON) can store."""
import collections
import json
import time
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagas import services
from sagas.flows import ORDER_FLOW
from sagas.models import Saga, TimelineEntry
from sagas.replies import MAX_DEPTH, PoisonMessage, parse_reply
from tests.conftest import ORDER

SAGA = "6f1c1a8e-4c6f-4d7e-9a55-0c3b2f3d9e11"
NASTY_TEXT = ["\x00", "\ud800", "\udfff", "\ud83d\ude00", "\x01\x1f\x7f", "\u2028", "\ufeff", "é", "'\"\\", "%s{}", "x" * 300]
NASTY_NUMBERS = ["1e999", "-1e999", "1e-999", "1" * 5000, "1" * 4000, "0.1e1", "-0", "2147483648", "9" * 30,
                 "NaN", "Infinity", "-Infinity", "1E400", "123456789012.345", "99999999999999.99", "1_000"]

texts = st.one_of(st.text(max_size=40), st.sampled_from(NASTY_TEXT),
                  st.tuples(st.text(max_size=10), st.sampled_from(NASTY_TEXT)).map("".join))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(texts, inner, max_size=4)), max_leaves=12)


def _valid_reply(command: str, status: str) -> dict:
    data = {"stock.reduce": {"total": "19.98"}, "order.create": {"order_id": "o-1"}}.get(command, {})
    return {"saga_id": SAGA, "command": command, "attempt": 1, "status": status,
            "reason": None if status == "success" else "out_of_stock", "data": data}


@st.composite
def near_valid(draw) -> bytes:
    """A contract reply with a few fields swapped for anything, dropped, or grown."""
    reply = _valid_reply(draw(st.sampled_from(sorted(ORDER_FLOW.commands))), draw(st.sampled_from(["success", "failure"])))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(["saga_id", "command", "attempt", "status", "reason", "data", "extra"]))
        action = draw(st.sampled_from(["replace", "drop", "data field"]))
        if action == "drop":
            reply.pop(key, None)
        elif action == "data field":
            data = reply["data"] if isinstance(reply.get("data"), dict) else {}
            data[draw(st.sampled_from(["total", "order_id", "note", draw(texts)]))] = draw(json_values)
            reply["data"] = data
        else:
            reply[key] = draw(json_values)
    text = json.dumps(reply, ensure_ascii=draw(st.booleans()))
    # numbers json.dumps would never write, spliced in as text
    if draw(st.booleans()):
        number = draw(st.sampled_from(NASTY_NUMBERS))
        field = draw(st.sampled_from(['"attempt": 1', '"total": "19.98"', '"reason": null']))
        text = text.replace(field, field.split(":")[0] + ": " + number)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def deeply_nested(draw) -> bytes:
    depth = draw(st.integers(1, 3000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    inner = opener * depth + "1" + closer * depth
    return json.dumps(_valid_reply("stock.restore", "success"))[:-1].encode() + f', "data": {{"x": {inner}}}}}'.encode()


@st.composite
def byte_mutated(draw) -> bytes:
    body = bytearray(draw(near_valid()))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(body)))
        change = draw(st.sampled_from(["flip", "insert", "delete"]))
        if change == "insert" or not body or position == len(body):
            body[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif change == "flip":
            body[position] = draw(st.integers(0, 255))
        else:
            del body[position]
    return bytes(body)


bodies = st.one_of(near_valid(), deeply_nested(), byte_mutated(), st.binary(max_size=200),
                   json_values.map(lambda value: json.dumps(value).encode("utf-8", "surrogatepass")))


@pytest.fixture
def stored_saga(db):
    saga, _ = services.start_order_saga(user_id="fuzz", items=ORDER["items"], currency="EUR", payment_method=None)
    return saga


def test_parse_reply_raises_only_poison_and_what_it_accepts_is_storable(stored_saga):
    seen = collections.Counter()
    started = time.monotonic()

    @settings(max_examples=3000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(body=bodies)
    def check(body):
        try:
            saga_id, reply = parse_reply(body)
        except PoisonMessage as poison:
            assert str(poison)
            seen["poison"] += 1
            return
        seen["accepted"] += 1
        _store(stored_saga, saga_id, reply)

    check()
    print(f"parse_reply fuzz: {sum(seen.values())} bodies, {dict(seen)}, {time.monotonic() - started:.1f}s")
    assert seen["accepted"] > 50 and seen["poison"] > 1000  # both sides were exercised


def _store(saga: Saga, saga_id: str, reply) -> None:
    """Write an accepted reply where the service writes it, and read it back unchanged."""
    with transaction.atomic():  # a savepoint: one refused write must not hide the next example
        _store_in_savepoint(saga, saga_id, reply)


def _store_in_savepoint(saga: Saga, saga_id: str, reply) -> None:
    redis_text = json.dumps({"saga_id": saga_id, "data": reply.data, "reason": reply.reason}, allow_nan=False)
    body = {"data": reply.data} if reply.data else None
    entry = TimelineEntry.objects.create(
        saga=saga, at=datetime.now(timezone.utc), kind=TimelineEntry.Kind.REPLY, command=reply.command,
        attempt=reply.attempt, status=reply.status, reason=reply.reason or "", applied=False, body=body)
    entry.refresh_from_db()
    assert (entry.command, entry.attempt, entry.status) == (reply.command, reply.attempt, reply.status)
    assert entry.reason == (reply.reason or "")
    assert _same_json(entry.body, body)
    # the facts a success teaches go to the saga's columns (sagas.flows: data field -> fact)
    learned = {fact: reply.data[field] for field, fact in ORDER_FLOW.step_of(reply.command).learns
               if reply.status == "success" and reply.command == ORDER_FLOW.step_of(reply.command).command}
    Saga.objects.filter(pk=saga.pk).update(
        order_id=learned.get("order_id"), total=Decimal(learned["amount"]) if "amount" in learned else None,
        failure_reason=reply.reason)
    row = Saga.objects.values("order_id", "total", "failure_reason").get(pk=saga.pk)
    assert row["failure_reason"] == reply.reason and row["order_id"] == learned.get("order_id")
    if "amount" in learned:
        assert row["total"] == Decimal(learned["amount"])
    assert json.loads(redis_text)["saga_id"] == saga_id


def _same_json(stored, sent) -> bool:
    """Equal as JSON; jsonb keeps a number's value, not its spelling (4.2e+16 comes back an integer)."""
    if isinstance(sent, (int, float)) and not isinstance(sent, bool):
        return not isinstance(stored, bool) and isinstance(stored, (int, float)) and Decimal(repr(stored)) == Decimal(repr(sent))
    if isinstance(sent, dict):
        return isinstance(stored, dict) and stored.keys() == sent.keys() and all(_same_json(stored[k], sent[k]) for k in sent)
    if isinstance(sent, list):
        return isinstance(stored, list) and len(stored) == len(sent) and all(map(_same_json, stored, sent))
    return stored == sent


def test_nesting_is_refused_before_json_reads_it():
    just_deep_enough = (b'{"saga_id":"' + SAGA.encode() + b'","command":"stock.restore","attempt":1,"status":"success",'
                        b'"data":{"x":' + b"[" * (MAX_DEPTH - 2) + b"]" * (MAX_DEPTH - 2) + b"}}")
    assert parse_reply(just_deep_enough)[0] == SAGA
    with pytest.raises(PoisonMessage, match="nested deeper"):
        parse_reply(just_deep_enough.replace(b"[", b"[[", 1).replace(b"]", b"]]", 1))
