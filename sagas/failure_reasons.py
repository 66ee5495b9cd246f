"""A saga's failure reason in plain words, for a support person reading it out on a call.

The engine and the participants speak in short machine reasons (`out_of_stock`,
`reduce_stock_timed_out`, `payment.refund did not succeed: ...`); this turns them into sentences.
"""
from __future__ import annotations

from sagas import flows
from sagas.vocabulary import GAVE_UP, STAFF_REASON_PREFIX, failed_reason, timed_out_reason

STEP_WORDS = {"reduce_stock": "reserving the stock", "take_payment": "taking the payment",
              "create_order": "creating the order"}
COMPENSATION_WORDS = {"stock.restore": "putting the stock back", "payment.refund": "refunding the payment",
                      "order.cancel": "cancelling the order"}
PARTICIPANT_REASONS = {
    "out_of_stock": "A product in the order was out of stock, so nothing was charged and the order was not placed.",
    "unknown_product": "The order named a product the stock service does not know.",
    "payment_declined": "The customer's payment was declined, so the order is undone: the reserved stock goes back.",
    "invalid_payload": "A service refused a command as malformed; this is a fault on our side, not the customer's.",
    "already_compensated": "A service had already undone this step when the command arrived late.",
}


def explain_failure(reason: str | None) -> str | None:
    if not reason:
        return None
    if reason in PARTICIPANT_REASONS:
        return PARTICIPANT_REASONS[reason]
    if reason.startswith(STAFF_REASON_PREFIX):
        return f"A staff member undid the order, giving the reason: “{reason[len(STAFF_REASON_PREFIX):]}”."
    command, gave_up, why = reason.partition(GAVE_UP)
    if gave_up:
        undoing = COMPENSATION_WORDS.get(command, command)
        return (f"Undoing the order got stuck at {undoing}: it did not succeed ({why}). Staff must act: "
                f"resume the compensation, or mark the step compensated once it was undone by hand. "
                f"If the service still answers with a success, the undoing carries on by itself.")
    for step in {step.name: step for flow in flows.registered() for step in flow.steps}.values():
        if reason == timed_out_reason(step.name):
            return (f"The service for {STEP_WORDS.get(step.name, step.name)} never answered, though we asked again with longer "
                    f"and longer waits, so we gave up on it and undid everything in case it had happened anyway.")
        if reason == failed_reason(step.name):
            return f"{STEP_WORDS.get(step.name, step.name).capitalize()} failed without a reason given."
    return f"The order failed with the reason “{reason}”."
