"""The order saga on DBOS Transact 3.4: a workflow checkpointed in PostgreSQL, its steps run in
this process (no broker, no HTTP). The driver's clients call the workflow directly.

    python -m lab.peers.dbos_peer --sagas 2000 --concurrency 16 --single 200

Reads PEER_DBOS_URL (a postgresql:// URL of the peer's own database, DBOS's system database) and
PEER_LEDGER (the SQLite ledger of its participants' work). DBOS records the workflow's start,
each step's output and its end in that database, so a crash resumes the saga where it stopped:
the durable work our service does too, which celery-saga does not.
"""
from __future__ import annotations

import argparse
import logging
import os

from dbos import DBOS, SetWorkflowID

from lab.peers import steps
from lab.peers.driver import pass_arguments, passes_from, serve_passes

LEDGER = os.environ.get("PEER_LEDGER", "var/bench/peers/dbos_ledger.sqlite3")


@DBOS.step()
def participant_step(order_ref: str, command: str, facts: dict) -> dict:
    # a failure is returned, not raised: the workflow decides, and nothing needs to pickle an exception
    try:
        return {"ok": True, "learned": steps.learned(command, steps.run_command(
            LEDGER, saga_id=order_ref, command=command, facts=facts))}
    except steps.StepFailed as failed:
        return {"ok": False, "reason": failed.reason}


@DBOS.workflow()
def order_saga(order_ref: str, facts: dict) -> str:
    undo: list[str] = []
    for forward, compensation in steps.STEPS:
        outcome = participant_step(order_ref, forward, facts)
        if not outcome["ok"]:
            for command in reversed(undo):
                if not participant_step(order_ref, command, facts)["ok"]:
                    return "failed"
            return "compensated"
        facts = {**facts, **outcome["learned"]}
        undo.append(compensation)
    return "completed"


def main() -> None:
    parser = argparse.ArgumentParser(description="Drive the DBOS Transact peer, in this process.")
    pass_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level)
    DBOS(config={"name": "saga-peer", "system_database_url": os.environ["PEER_DBOS_URL"],
                 "log_level": args.log_level})
    DBOS.launch()

    def one_saga(reference: str, facts: dict) -> str:
        with SetWorkflowID(reference):
            return order_saga(reference, facts)

    try:
        serve_passes(passes_from(args, declined=steps.DECLINED_PAYMENT_METHOD, approved=steps.PAYMENT_METHOD),
                     one_saga, lambda method: steps.order_facts(payment_method=method))
    finally:
        DBOS.destroy()


if __name__ == "__main__":
    main()
