"""Poison replies: messages on saga.replies that the consumer must set aside (dead-letter) and
get past. Each has a message_id of its own, so the dead-letter queue can be matched one by one."""
from __future__ import annotations

import json
import random
import uuid

from lab.faults.infra import RawMessage
from sagas.broker import REPLIES_QUEUE


def _json(body: object) -> bytes:
    return json.dumps(body).encode()


def _shapes(saga_id: str) -> list[tuple[str, bytes]]:
    """(why it is poison, body). `saga_id` is a real saga where the shape allows it, so the
    orchestrator also notes the dead letter on that saga's timeline."""
    good = {"saga_id": saga_id, "command": "stock.reduce", "attempt": 1, "status": "success", "reason": None,
            "data": {"total": "1.00"}}
    return [
        ("not JSON", b"{this is not json"),
        ("not UTF-8", b"\xff\xfe\x00garbage"),
        ("a JSON array", b"[1, 2, 3]"),
        ("no saga_id", _json({k: v for k, v in good.items() if k != "saga_id"})),
        ("saga_id not a UUID", _json({**good, "saga_id": "not-a-uuid"})),
        ("unknown command", _json({**good, "command": "stock.explode"})),
        ("attempt zero", _json({**good, "attempt": 0})),
        ("attempt a string", _json({**good, "attempt": "1"})),
        ("status neither success nor failure", _json({**good, "status": "maybe"})),
        ("stock.reduce success without total", _json({**good, "data": {}})),
        ("order.create success without order_id", _json({**good, "command": "order.create", "data": {"note": 1}})),
        ("data not an object", _json({**good, "status": "failure", "data": [1]})),
        ("reason not a string", _json({**good, "status": "failure", "reason": 42})),
        ("reply for an unknown saga", _json({**good, "saga_id": str(uuid.uuid4())})),
        ("over 64 KiB", _json({**good, "data": {"total": "1.00", "padding": "x" * 70_000}})),
    ]


def poison_messages(*, run_id: str, first: int, count: int, saga_ids: list[str], seed: int) -> list[tuple[str, RawMessage]]:
    """`count` poison messages numbered from `first`, cycling through every shape."""
    rng = random.Random(f"poison-shapes-{seed}-{first}")
    messages = []
    for number in range(first, first + count):
        saga_id = rng.choice(saga_ids) if saga_ids else str(uuid.uuid4())
        shapes = _shapes(saga_id)
        why, body = shapes[number % len(shapes)]
        message = RawMessage(message_id=f"poison-{run_id}-{number}", correlation_id=saga_id,
                             headers={"x-fault-run-poison": why}, body=body)
        messages.append((REPLIES_QUEUE, message))
    return messages
