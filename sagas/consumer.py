"""The consumer's loop body: one reply in, one transition out; deadlines and the outbox relay
between messages. The broker loop itself lives in sagas.messaging."""
import logging
import time

from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections

from sagas import messaging, outbox, services
from sagas.replies import PoisonMessage, parse_reply

log = logging.getLogger(__name__)

MAX_HANDLER_TRIES = 3
TRIES_HEADER = "x-saga-handler-tries"


class SagaConsumer:
    def __init__(self, broker: messaging.Broker, *, prefetch: int = 50, deadline_check_seconds: float = 0.25):
        self.broker = broker
        self.prefetch = prefetch
        self.deadline_check_seconds = deadline_check_seconds
        self.stopping = False
        self.dead_lettered = 0
        self._next_deadline_check = 0.0
        self._next_relay = 0.0

    def stop(self, *_signal) -> None:
        log.info("stopping after the message in hand")
        self.stopping = True

    def run(self) -> None:
        outbox.use_publisher(self.broker)
        self.broker.consume(messaging.REPLIES_QUEUE, self.handle_delivery, prefetch=self.prefetch,
                            should_stop=lambda: self.stopping, tick=self.tick,
                            busy_tick=lambda: self.tick(deadlines=False), handle_batch=self.handle_batch)
        outbox.flush_sent()
        self.broker.close()
        log.info("consumer stopped", extra={"dead_lettered": self.dead_lettered})

    def handle_delivery(self, delivery: messaging.Delivery) -> None:
        try:
            saga_id, reply = parse_reply(delivery.body)
        except PoisonMessage as poison:
            return self.dead_letter(delivery, str(poison))
        try:
            services.handle_reply(saga_id=saga_id, reply=reply, message_id=delivery.message_id or "",
                                  redelivered=delivery.redelivered)
        except services.SagaNotFound:
            self.dead_letter(delivery, f"unknown saga {saga_id}")
        except (OperationalError, InterfaceError, services.ConcurrentChange) as error:  # an outage, not the message
            close_old_connections()
            raise messaging.RetryLater(f"database unavailable: {error!r}") from error
        except Exception as error:  # a bug: try a few times without blocking the queue, then set aside
            self.retry_or_dead_letter(delivery, error)

    def handle_batch(self, deliveries: list[messaging.Delivery]) -> set[int]:
        """Apply a round of replies together where that is plain sailing (see services.handle_replies);
        the positions of those applied. The rest, and all of them if anything goes wrong here, go
        through `handle_delivery` one by one."""
        parsed = []
        for position, delivery in enumerate(deliveries):
            try:
                saga_id, reply = parse_reply(delivery.body)
            except PoisonMessage:
                continue
            parsed.append((position, services.IncomingReply(saga_id, reply, delivery.message_id or "", delivery.redelivered)))
        if len(parsed) < 2:
            return set()
        try:
            applied = services.handle_replies([incoming for _, incoming in parsed])
        except Exception as error:  # each reply will be judged alone, with its own error handling
            close_old_connections()
            log.warning("replies not applied together, one by one instead: %r", error, extra={"replies": len(parsed)})
            return set()
        return {position for (position, _), ok in zip(parsed, applied) if ok}

    def retry_or_dead_letter(self, delivery: messaging.Delivery, error: Exception) -> None:
        tries = int(delivery.headers.get(TRIES_HEADER, 0)) + 1
        log.exception("reply handler failed", extra={"message_id": delivery.message_id, "tries": tries})
        if tries >= MAX_HANDLER_TRIES:
            return self.dead_letter(delivery, f"handler failed {tries} times: {error!r}")
        self.broker.publish(exchange="", routing_key=messaging.REPLIES_QUEUE, body=delivery.body,
                            message_id=delivery.message_id, correlation_id=delivery.correlation_id,
                            headers={**delivery.headers, TRIES_HEADER: tries})

    def dead_letter(self, delivery: messaging.Delivery, reason: str) -> None:
        self.broker.publish(exchange="", routing_key=messaging.DEAD_LETTER_QUEUE, body=delivery.body,
                            message_id=delivery.message_id, correlation_id=delivery.correlation_id,
                            headers={**delivery.headers, "x-dead-letter-reason": reason})
        self.dead_lettered += 1
        log.warning("reply dead-lettered", extra={"reason": reason, "message_id": delivery.message_id,
                                                   "saga_id": delivery.correlation_id, "dead_lettered": self.dead_lettered})
        try:
            services.record_dead_letter(saga_id=delivery.correlation_id, reason=reason, message_id=delivery.message_id or "")
        except DatabaseError:  # the dead-letter queue has it; the timeline line is a courtesy
            log.warning("dead letter not put on the timeline", extra={"saga_id": delivery.correlation_id})

    def tick(self, *, deadlines: bool = True) -> None:
        """Deadlines and the outbox relay. During a backlog of replies (`deadlines=False`) only the
        relay: the replies that deadlines would give up on may be waiting in the backlog, and
        resending for them would only grow it (with short step timeouts, a storm of resends)."""
        now = time.monotonic()
        try:
            close_old_connections()
            if deadlines and now >= self._next_deadline_check:
                self._next_deadline_check = now + self.deadline_check_seconds
                services.handle_due_timeouts()
            if now >= self._next_relay:
                self._next_relay = now + 1.0
                outbox.relay_pending()
        except (DatabaseError, services.ConcurrentChange) as error:
            close_old_connections()
            log.warning("deadline check or relay postponed: %r", error)
            self._next_deadline_check = self._next_relay = now + 2.0
        except Exception:
            log.exception("deadline check or relay failed; trying again shortly")
            self._next_deadline_check = self._next_relay = now + 2.0
