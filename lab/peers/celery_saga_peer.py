"""The order saga on celery-saga 0.1.1 over Celery 5.7: the Celery app, its step tasks, and the driver.

    celery -A lab.peers.celery_saga_peer worker --concurrency 2 --prefetch-multiplier 25   # the worker
    python -m lab.peers.celery_saga_peer --sagas 2000 --concurrency 16 --single 200       # the driver

Both read PEER_BROKER_URL (an amqp:// URL with the peer's own vhost), PEER_REDIS_URL (the peer's
own Redis db) and PEER_LEDGER (the SQLite ledger of its participants' work) from the environment.

Set up as a team would: one task per step (celery-saga chains start -> each step -> complete as
tasks through RabbitMQ, running the step's own task inside its step task), acks late, prefetch 50
(25 per worker process, 2 processes), no result backend (celery-saga keeps its state in Redis),
Celery's default publishing (persistent messages, no publisher confirms). The one addition: the
state backend also PUBLISHes a saga's terminal status on a Redis channel when it saves it, in the
same pipeline, so the driver learns of the end at once instead of polling (SagaResult.get polls).
"""
from __future__ import annotations

import argparse
import json
import os
import threading

from celery import Celery
from celery_saga import PermanentFailure, Saga, StepResponse, set_default_backend
from celery_saga.backends.redis import RedisSagaBackend
from celery_saga.result import TERMINAL_STATUSES

from lab.peers import steps
from lab.peers.driver import pass_arguments, passes_from, serve_passes

DONE_CHANNEL = "celery-saga-peer:done"
LEDGER = os.environ.get("PEER_LEDGER", "var/bench/peers/celery_ledger.sqlite3")

app = Celery("saga_peer", broker=os.environ.get("PEER_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(task_acks_late=True, worker_prefetch_multiplier=25, worker_concurrency=2, task_ignore_result=True,
                broker_connection_retry_on_startup=True)
# celery-saga publishes through current_app, which is per thread: without this, the driver's client
# threads would get Celery's fallback app (the default vhost) instead of this one
app.set_default()


class NotifyingRedisBackend(RedisSagaBackend):
    def save(self, execution) -> None:
        pipe = self._client.pipeline()
        pipe.set(self._key(execution.saga_id), json.dumps(execution.to_dict()), ex=self.ttl)
        if execution.idempotency_key:
            pipe.set(self._idem_key(execution.idempotency_key), execution.saga_id, ex=self.ttl)
        if execution.status in TERMINAL_STATUSES:
            pipe.publish(DONE_CHANNEL, json.dumps({"saga_id": execution.saga_id, "status": execution.status.value}))
        pipe.execute()


backend = NotifyingRedisBackend(url=os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/7"))
set_default_backend(backend)


def _forward(command: str, context: dict) -> StepResponse:
    try:
        data = steps.run_command(LEDGER, saga_id=context["order_ref"], command=command, facts=context)
    except steps.StepFailed as failed:
        raise PermanentFailure(str(failed)) from None  # nothing applied: only the steps before are undone
    learned = steps.learned(command, data)
    return StepResponse(output=learned, compensation_data={**context, **learned})


def _compensate(command: str, context: dict) -> None:
    steps.run_command(LEDGER, saga_id=context["order_ref"], command=command, facts=context)


@app.task(name="peer.stock_restore")
def stock_restore(compensation_data):
    _compensate("stock.restore", compensation_data)


@app.task(name="peer.payment_refund")
def payment_refund(compensation_data):
    _compensate("payment.refund", compensation_data)


@app.task(name="peer.order_cancel")
def order_cancel(compensation_data):
    _compensate("order.cancel", compensation_data)


@app.task(name="peer.stock_reduce")
def stock_reduce(**context):
    return _forward("stock.reduce", context)


@app.task(name="peer.payment_take")
def payment_take(**context):
    return _forward("payment.take", context)


@app.task(name="peer.order_create")
def order_create(**context):
    return _forward("order.create", context)


ORDER_SAGA = (Saga("order_saga").add_step(stock_reduce, compensate=stock_restore)
              .add_step(payment_take, compensate=payment_refund).add_step(order_create, compensate=order_cancel))


class DoneListener:
    """Terminal statuses as the state backend announces them, by celery-saga's saga id."""

    def __init__(self):
        self._done: dict[str, str] = {}
        self._waiters: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._pubsub = backend._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(DONE_CHANNEL)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            message = self._pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            event = json.loads(message["data"])
            with self._lock:
                self._done[event["saga_id"]] = event["status"]
                waiter = self._waiters.pop(event["saga_id"], None)
            if waiter:
                waiter.set()

    def wait(self, saga_id: str, timeout: float) -> str:
        with self._lock:
            if saga_id in self._done:
                return self._done.pop(saga_id)
            waiter = self._waiters[saga_id] = threading.Event()
        waiter.wait(timeout)
        with self._lock:
            self._waiters.pop(saga_id, None)
            return self._done.pop(saga_id, "no terminal status")


def main() -> None:
    parser = argparse.ArgumentParser(description="Drive the celery-saga peer (its worker runs apart).")
    pass_arguments(parser)
    parser.add_argument("--saga-timeout", type=float, default=120.0)
    args = parser.parse_args()
    listener = DoneListener()

    def one_saga(reference: str, facts: dict) -> str:
        return listener.wait(ORDER_SAGA.run(order_ref=reference, **facts).saga_id, args.saga_timeout)

    serve_passes(passes_from(args, declined=steps.DECLINED_PAYMENT_METHOD, approved=steps.PAYMENT_METHOD),
                 one_saga, lambda method: steps.order_facts(payment_method=method))


if __name__ == "__main__":
    main()
