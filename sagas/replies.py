"""Reading a participant's reply off the bus: the contract's shape, or a reason to set it aside."""
import json
import uuid
from decimal import Decimal, InvalidOperation

from sagas.engine import Reply
from sagas.flow import STEP_BY_COMMAND
from sagas.models import Saga

MAX_REPLY_BYTES = 64 * 1024
# what the saga's columns hold
_TOTAL = Saga._meta.get_field("total")
MAX_TOTAL = Decimal(10) ** (_TOTAL.max_digits - _TOTAL.decimal_places) - Decimal(10) ** -_TOTAL.decimal_places
MAX_ORDER_ID_LENGTH = Saga._meta.get_field("order_id").max_length


class PoisonMessage(Exception):
    """A reply that can never be processed; the message says why."""


def parse_reply(body: bytes) -> tuple[str, Reply]:
    if len(body) > MAX_REPLY_BYTES:
        raise PoisonMessage(f"body of {len(body)} bytes is over the {MAX_REPLY_BYTES} byte limit")
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise PoisonMessage(f"not valid UTF-8 JSON: {error}") from None
    if not isinstance(message, dict):
        raise PoisonMessage("not a JSON object")
    saga_id, command, attempt = message.get("saga_id"), message.get("command"), message.get("attempt")
    status, reason, data = message.get("status"), message.get("reason"), message.get("data")
    try:
        saga_id = str(uuid.UUID(saga_id))
    except (TypeError, ValueError, AttributeError):
        raise PoisonMessage("saga_id is not a UUID string") from None
    if command not in STEP_BY_COMMAND:
        raise PoisonMessage(f"unknown command {command!r}")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise PoisonMessage("attempt is not a positive integer")
    if status not in ("success", "failure"):
        raise PoisonMessage("status is neither 'success' nor 'failure'")
    if reason is not None and not isinstance(reason, str):
        raise PoisonMessage("reason is neither null nor a string")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PoisonMessage("data is neither null nor an object")
    if status == "success":
        data = _learned_data(command, data)
    return saga_id, Reply(command=command, attempt=attempt, status=status, reason=reason, data=data)


def _learned_data(command: str, data: dict) -> dict:
    """A success reply must carry, well formed, every field its step learns (sagas.flow)."""
    definition = STEP_BY_COMMAND[command]
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
        if isinstance(total, bool) or not isinstance(total, (str, int, float)):
            raise InvalidOperation
        amount = Decimal(str(total))
        if not amount.is_finite():
            raise InvalidOperation
    except InvalidOperation:
        raise PoisonMessage(f"{command} success without a decimal data.{data_field}") from None
    if not 0 <= amount <= MAX_TOTAL:
        raise PoisonMessage(f"data.{data_field} {total!r} is outside 0..{MAX_TOTAL}")
    return f"{amount:.2f}"


def _order_id(command: str, data_field: str, order_id) -> str:
    if isinstance(order_id, bool) or not isinstance(order_id, (str, int)) or str(order_id) == "":
        raise PoisonMessage(f"{command} success without data.{data_field}")
    if len(str(order_id)) > MAX_ORDER_ID_LENGTH:
        raise PoisonMessage(f"data.{data_field} is longer than {MAX_ORDER_ID_LENGTH} characters")
    return str(order_id)


_CHECKS = {"total": _total, "order_id": _order_id}
