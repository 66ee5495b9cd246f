"""Reading replies off the bus: the contract's shape, or the reason it is poison."""
import json

import pytest

from sagas.replies import PoisonMessage, parse_reply

SAGA = "6f1c1a8e-4c6f-4d7e-9a55-0c3b2f3d9e11"


def reply(**changes):
    body = {"saga_id": SAGA, "command": "stock.reduce", "attempt": 1, "status": "success", "reason": None,
            "data": {"total": "19.98"}}
    body.update(changes)
    return json.dumps(body).encode()


def test_a_contract_reply_is_read():
    saga_id, parsed = parse_reply(reply())
    assert saga_id == SAGA
    assert (parsed.command, parsed.attempt, parsed.status, parsed.data["total"]) == ("stock.reduce", 1, "success", "19.98")


def test_totals_are_normalised_to_cents_and_failure_needs_no_data():
    assert parse_reply(reply(data={"total": 5}))[1].data["total"] == "5.00"
    assert parse_reply(reply(status="failure", reason="out_of_stock", data=None))[1].reason == "out_of_stock"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b"[]", "not a JSON object"),
        (reply(saga_id=7), "saga_id"),
        (reply(command="stock.steal"), "unknown command"),
        (reply(attempt=0), "attempt"),
        (reply(attempt=True), "attempt"),
        (reply(status="ok"), "status"),
        (reply(reason=3), "reason"),
        (reply(data=[1]), "data is neither"),
        (reply(data={}), "data.total"),
        (reply(data={"total": "NaN"}), "data.total"),
        (reply(data={"total": "1e20"}), "outside"),
        (reply(data={"total": "-1"}), "outside"),
        (reply(command="order.create", data={}), "order_id"),
        (reply(command="order.create", data={"order_id": "o" * 129}), "longer than"),
        (b" " * (64 * 1024 + 1), "byte limit"),
    ],
)
def test_poison_is_named(body, why):
    with pytest.raises(PoisonMessage, match=why):
        parse_reply(body)
