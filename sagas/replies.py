"""Reading a participant's reply off the bus: the contract's shape, or a reason to set it aside.

A reply that parses can be stored: whatever PostgreSQL (text, jsonb, integer and numeric
columns) or Redis (JSON) would refuse is refused here, so a real success is never lost to a
storage error after it was accepted. The work is bounded before `json` sees the body.
"""
import json
import math
import re
import uuid
from decimal import Decimal, InvalidOperation
from itertools import accumulate

from sagas import flows
from sagas.engine import Reply
from sagas.models import Saga, TimelineEntry

MAX_REPLY_BYTES = 64 * 1024
# json's C parser recurses once per level and raises RecursionError (not ValueError) near the
# interpreter's limit, which depends on how deep the caller already is: refuse long before
MAX_DEPTH = 32
MAX_ATTEMPT = 2**31 - 1  # TimelineEntry.attempt is a PostgreSQL integer
# the contract's reason is a short machine-readable string; the admin and the events show it
MAX_REASON_LENGTH = 1000
# what the saga's columns hold
_TOTAL = Saga._meta.get_field("total")
MAX_TOTAL = Decimal(10) ** (_TOTAL.max_digits - _TOTAL.decimal_places) - Decimal(10) ** -_TOTAL.decimal_places
MAX_ORDER_ID_LENGTH = Saga._meta.get_field("order_id").max_length
MAX_MESSAGE_ID_LENGTH = TimelineEntry._meta.get_field("message_id").max_length

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_A_BRACKET = re.compile(rb"[^\[\]{}]")
# PostgreSQL refuses NUL in text and jsonb; a lone surrogate cannot be encoded as UTF-8 at all
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class PoisonMessage(Exception):
    """A reply that can never be processed; the message says why."""


def parse_reply(body: bytes) -> tuple[str, Reply]:
    if not isinstance(body, (bytes, bytearray)):
        raise PoisonMessage("body is not bytes")
    if len(body) > MAX_REPLY_BYTES:
        raise PoisonMessage(f"body of {len(body)} bytes is over the {MAX_REPLY_BYTES} byte limit")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as error:
        raise PoisonMessage(f"not valid UTF-8 JSON: {error.reason} at byte {error.start}") from None
    if _depth(body) > MAX_DEPTH:
        raise PoisonMessage(f"nested deeper than {MAX_DEPTH} levels")
    try:
        message = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as error:
        raise PoisonMessage(f"not valid UTF-8 JSON: {_shown(str(error))}") from None
    if not isinstance(message, dict):
        raise PoisonMessage("not a JSON object")
    saga_id, command, attempt = message.get("saga_id"), message.get("command"), message.get("attempt")
    status, reason, data = message.get("status"), message.get("reason"), message.get("data")
    try:
        if not isinstance(saga_id, str) or len(saga_id) > 64:
            raise ValueError
        saga_id = str(uuid.UUID(saga_id))
    except ValueError:
        raise PoisonMessage("saga_id is not a UUID string") from None
    if not isinstance(command, str) or flows.any_step_of(command) is None:
        raise PoisonMessage(f"unknown command {_shown(command)}")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or not 1 <= attempt <= MAX_ATTEMPT:
        raise PoisonMessage(f"attempt is not an integer in 1..{MAX_ATTEMPT}")
    if status not in ("success", "failure"):
        raise PoisonMessage("status is neither 'success' nor 'failure'")
    if reason is not None and not isinstance(reason, str):
        raise PoisonMessage("reason is neither null nor a string")
    if reason is not None and len(reason) > MAX_REASON_LENGTH:
        raise PoisonMessage(f"reason is longer than {MAX_REASON_LENGTH} characters")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PoisonMessage("data is neither null nor an object")
    _refuse_unstorable(reason, "reason")
    _refuse_unstorable(data, "data")
    if status == "success":
        data = _learned_data(command, data)
    return saga_id, Reply(command=command, attempt=attempt, status=status, reason=reason, data=data)


def escaped_text(value: str | None, limit: int = 255) -> str:
    """`value` as a text column, a jsonb value and an AMQP header all take it: NUL and lone
    surrogates escaped, at most `limit` characters (for what we write: reasons, copied ids)."""
    if not value:
        return ""
    return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")[:limit]


def saga_id_of(value) -> str | None:
    """The saga id `value` names (a UUID string), or None."""
    try:
        return str(uuid.UUID(value)) if isinstance(value, str) and len(value) <= 64 else None
    except ValueError:
        return None


def storable_text(value, *, max_length: int = MAX_MESSAGE_ID_LENGTH) -> str:
    """`value` if a text column can hold it, else "" (for properties we only record, like message_id)."""
    if isinstance(value, str) and len(value) <= max_length and not _UNSTORABLE.search(value):
        return value
    return ""


def _depth(body: bytes) -> int:
    """How deeply the body nests arrays and objects, brackets inside strings aside; linear time."""
    brackets = _NOT_A_BRACKET.sub(b"", _JSON_STRING.sub(b"", body))
    return max(accumulate(1 if byte in b"[{" else -1 for byte in brackets), default=0)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN/Infinity; jsonb refuses them


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("number out of range")  # 1e999 reads as inf, which jsonb refuses
    return number


def _refuse_unstorable(value, where: str) -> None:
    """No NUL and no lone surrogate in any string or key (depth is already bounded)."""
    if isinstance(value, str):
        if _UNSTORABLE.search(value):
            raise PoisonMessage(f"{where} holds a NUL or a lone surrogate, which the database cannot store")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_unstorable(key, where)
            _refuse_unstorable(item, where)
    elif isinstance(value, list):
        for item in value:
            _refuse_unstorable(item, where)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _learned_data(command: str, data: dict) -> dict:
    """A success reply must carry, well formed, every field its step learns (sagas.flows)."""
    definition = flows.any_step_of(command)
    if command != definition.command:
        return data  # a compensation teaches nothing
    for data_field, _fact in definition.learns:
        data = {**data, data_field: _CHECKS.get(data_field, _present)(command, data_field, data.get(data_field))}
    return data


def _present(command: str, data_field: str, value):
    if value is None:
        raise PoisonMessage(f"{command} success without data.{data_field}")
    return value


def _total(command: str, data_field: str, total) -> str:
    try:
        if isinstance(total, bool) or not isinstance(total, (str, int, float)) or len(str(total)) > 64:
            raise InvalidOperation
        amount = Decimal(str(total))
        if not amount.is_finite():
            raise InvalidOperation
    except InvalidOperation:
        raise PoisonMessage(f"{command} success without a decimal data.{data_field}") from None
    if not 0 <= amount <= MAX_TOTAL:
        raise PoisonMessage(f"data.{data_field} {_shown(total)} is outside 0..{MAX_TOTAL}")
    return f"{amount:.2f}"


def _order_id(command: str, data_field: str, order_id) -> str:
    if isinstance(order_id, bool) or not isinstance(order_id, (str, int)) or str(order_id) == "":
        raise PoisonMessage(f"{command} success without data.{data_field}")
    if len(str(order_id)) > MAX_ORDER_ID_LENGTH:
        raise PoisonMessage(f"data.{data_field} is longer than {MAX_ORDER_ID_LENGTH} characters")
    return str(order_id)


_CHECKS = {"total": _total, "order_id": _order_id}
