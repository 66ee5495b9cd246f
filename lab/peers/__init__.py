"""The benchmark's peers: the same three-step order saga run by the tools a team might pick instead.

- celery_saga_peer: celery-saga 0.1.1 on Celery 5.7, the same RabbitMQ (a vhost of its own) and
  Redis (a db of its own) as the service; one Celery task per step, 2 worker processes, acks
  late, a channel prefetch of 50. Its state lives in Redis only (RedisSagaBackend), no HTTP.
- dbos_peer: DBOS Transact 3.4, the saga as a workflow checkpointed in the same PostgreSQL (a
  database of its own); the steps run in the workflow's process: no broker, no HTTP.

Fair work per step: every peer step is `demo.participants.handle_command` on a SQLite ledger,
the very code our demo participants run for each command (one ledger transaction: the receipt,
the idempotency row, the effect). What differs is only what carries the saga between steps.
The benchmark also keeps the per-process CPU accounting and the profiles here (cpu.py, profiling.py).
"""
