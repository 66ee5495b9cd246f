"""The consumer's loop body: one reply in, one transition out; deadlines and the outbox relay
between messages. The broker loop itself lives in sagas.broker.

Every delivery ends applied or dead-lettered with a reason. Only an outage (the database
unreachable, the broker gone) puts a message back; anything else that goes wrong with one
message stays with that message: it is tried at most MAX_HANDLER_TRIES times, counted in a header
only we can write (signed), then set aside.
"""
import hashlib
import logging
import time
import uuid

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections, connection
from django.utils.crypto import constant_time_compare, salted_hmac

from sagas import dead_letters, health, metrics, outbox, services
from sagas.broker import DEAD_LETTER_QUEUE, DEAD_LETTER_REASON, MAX_REASON_CHARS, REPLIES_QUEUE, Broker, Delivery, RetryLater
from sagas.replies import PoisonMessage, parse_reply, storable_text

log = logging.getLogger(__name__)

MAX_HANDLER_TRIES = 3
TRIES_HEADER = "x-saga-handler-tries"
TRIES_SIGNATURE_HEADER = "x-saga-handler-tries-signature"
REASON_HEADER = DEAD_LETTER_REASON


def handler_tries(delivery: Delivery) -> int:
    """The tries a delivery has had, as we counted them. Our count comes with our signature over
    it and the body, so a sender can neither make us retry forever (a negative count) nor skip
    the tries every message gets (a high one): anything else counts as none."""
    tries, signature = delivery.headers.get(TRIES_HEADER), delivery.headers.get(TRIES_SIGNATURE_HEADER)
    if (isinstance(tries, bool) or not isinstance(tries, int) or not 0 < tries < MAX_HANDLER_TRIES
            or not isinstance(signature, str) or not constant_time_compare(signature, _tries_signature(delivery.body, tries))):
        return 0
    return tries


def _tries_signature(body: bytes, tries: int) -> str:
    return salted_hmac(TRIES_HEADER, f"{tries}:{hashlib.sha256(body).hexdigest()}").hexdigest()


def _saga_id_of(value) -> str | None:
    try:
        return str(uuid.UUID(value)) if isinstance(value, str) and len(value) <= 64 else None
    except ValueError:
        return None


class SagaConsumer:
    def __init__(self, broker: Broker, *, prefetch: int = 50, deadline_check_seconds: float = 0.25,
                 participant_users: dict[str, str] | None = None):
        self.broker = broker
        self.prefetch = prefetch
        self.deadline_check_seconds = deadline_check_seconds
        # participant -> the RabbitMQ user whose replies it may send (None: anyone may answer)
        self.participant_users = settings.PARTICIPANT_USERS if participant_users is None else participant_users
        self.stopping = False
        self.dead_lettered = 0
        self._next_deadline_check = 0.0
        self._next_relay = 0.0
        # the round's verdicts, so a reply handle_batch judged is not parsed again one by one
        self._judged: dict[int, tuple[Delivery, services.IncomingReply | str]] = {}

    def stop(self, *_signal) -> None:
        log.info("stopping after the message in hand")
        self.stopping = True

    def run(self) -> None:
        outbox.use_publisher(self.broker)
        self.broker.consume(REPLIES_QUEUE, self.handle_delivery, prefetch=self.prefetch,
                            should_stop=lambda: self.stopping, tick=self.tick,
                            busy_tick=lambda: self.tick(deadlines=False), handle_batch=self.handle_batch,
                            dead_letter_queue=DEAD_LETTER_QUEUE)
        outbox.flush_sent()
        self.broker.close()
        log.info("consumer stopped", extra={"dead_lettered": self.dead_lettered})

    def judge(self, delivery: Delivery) -> services.IncomingReply | str:
        """The reply a delivery carries, if we accept it; else why not. The same rules for the
        batched and the one-by-one path, and each delivery is judged once."""
        kept = self._judged.pop(id(delivery), None)
        if kept is not None and kept[0] is delivery:
            return kept[1]
        try:
            saga_id, reply = parse_reply(delivery.body)
        except PoisonMessage as poison:
            return str(poison)
        except Exception as error:  # a parser bug must not stop the consumer either (the fuzz tests look for these)
            log.exception("reply parser failed", extra={"message_id": delivery.message_id})
            return f"reply parser failed: {error!r}"
        forged = self._forged(delivery, reply.command)
        if forged:
            return forged
        return services.IncomingReply(saga_id, reply, storable_text(delivery.message_id), delivery.redelivered)

    def _forged(self, delivery: Delivery, command: str) -> str | None:
        if not self.participant_users:
            return None
        participant = command.partition(".")[0]
        expected = self.participant_users.get(participant)
        if delivery.user_id is None or delivery.user_id != expected:
            return (f"forged: a reply to {command} must come from RabbitMQ user {expected!r} "
                    f"(PARTICIPANT_USERS), this one's user_id is {delivery.user_id!r}")
        return None

    def handle_delivery(self, delivery: Delivery) -> None:
        judged = self.judge(delivery)
        if isinstance(judged, str):
            return self.dead_letter(delivery, judged, saga_id=_saga_id_of(delivery.correlation_id))
        saga_id = judged.saga_id
        try:
            decision = services.handle_reply(saga_id=saga_id, reply=judged.reply, message_id=judged.message_id,
                                             redelivered=judged.redelivered)
            metrics.reply_outcome("applied" if decision.changed else "ignored", received_at=delivery.received_at)
        except services.SagaNotFound:
            self.dead_letter(delivery, f"unknown saga {saga_id}", saga_id=None)
        except services.NotInFlow as refused:
            self.dead_letter(delivery, str(refused), saga_id=saga_id)
        except (OperationalError, InterfaceError) as error:
            close_old_connections()
            if not _database_answers():
                raise RetryLater(f"database unavailable: {error!r}") from error
            self.retry_or_dead_letter(delivery, error, saga_id=saga_id)  # the database is fine: this message is not
        except Exception as error:  # a bug or a lost race: try a few times without blocking the queue, then set aside
            self.retry_or_dead_letter(delivery, error, saga_id=saga_id)

    def handle_batch(self, deliveries: list[Delivery]) -> set[int]:
        """Apply a round of replies together where that is plain sailing (see services.handle_replies);
        the positions of those applied. The rest, and all of them if anything goes wrong here, go
        through `handle_delivery` one by one."""
        self._judged = {}
        parsed = []
        for position, delivery in enumerate(deliveries):
            judged = self.judge(delivery)
            self._judged[id(delivery)] = (delivery, judged)
            if not isinstance(judged, str):
                parsed.append((position, judged))
        if len(parsed) < 2:
            return set()
        try:
            applied = services.handle_replies([incoming for _, incoming in parsed])
        except Exception as error:  # each reply will be judged alone, with its own error handling
            close_old_connections()
            log.warning("replies not applied together, one by one instead: %r", error, extra={"replies": len(parsed)})
            return set()
        done = {position for (position, _), ok in zip(parsed, applied) if ok}
        for position in done:
            self._judged.pop(id(deliveries[position]), None)
            metrics.reply_outcome("applied", received_at=deliveries[position].received_at)
        return done

    def retry_or_dead_letter(self, delivery: Delivery, error: Exception, *, saga_id: str | None) -> None:
        tries = handler_tries(delivery) + 1
        log.exception("reply handler failed", extra={"saga_id": saga_id, "message_id": delivery.message_id, "tries": tries})
        if tries >= MAX_HANDLER_TRIES:
            return self.dead_letter(delivery, f"handler failed {tries} times: {error!r}", saga_id=saga_id)
        self.broker.publish(exchange="", routing_key=REPLIES_QUEUE, body=delivery.body,
                            message_id=delivery.message_id, correlation_id=delivery.correlation_id,
                            headers={**delivery.headers, TRIES_HEADER: tries,
                                     TRIES_SIGNATURE_HEADER: _tries_signature(delivery.body, tries)})

    def dead_letter(self, delivery: Delivery, reason: str, *, saga_id: str | None) -> None:
        """Set the message aside with the reason; on its saga's timeline too, when it names one we know."""
        reason = _header_text(reason)
        self.broker.publish(exchange="", routing_key=DEAD_LETTER_QUEUE, body=delivery.body,
                            message_id=delivery.message_id, correlation_id=delivery.correlation_id,
                            headers={**delivery.headers, REASON_HEADER: reason})
        self.dead_lettered += 1
        metrics.reply_outcome("dead_lettered")
        log.warning("reply dead-lettered", extra={"reason": reason, "message_id": delivery.message_id,
                                                   "saga_id": saga_id, "dead_lettered": self.dead_lettered})
        try:
            services.record_dead_letter(saga_id=saga_id, reason=reason, message_id=storable_text(delivery.message_id))
        except DatabaseError:  # the dead-letter queue has it; the timeline line is a courtesy
            close_old_connections()
            log.warning("dead letter not put on the timeline", extra={"saga_id": saga_id})

    def tick(self, *, deadlines: bool = True) -> None:
        """Deadlines and the outbox relay. During a backlog of replies (`deadlines=False`) only the
        relay: the replies that deadlines would give up on may be waiting in the backlog, and
        resending for them would only grow it (with short step timeouts, a storm of resends)."""
        now = time.monotonic()
        health.loop_turned()
        metrics.sample()
        dead_letters.file_due(self.broker)
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


def _header_text(reason: str) -> str:
    """The reason as a header and a text column take it: UTF-8, no NUL, bounded."""
    text = reason.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return text[:MAX_REASON_CHARS]


def _database_answers() -> bool:
    try:
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except DatabaseError:
        close_old_connections()
        return False
