"""The consumer: the loop that drives the sagas from the participants' replies.

`SagaConsumer.run` reads top to bottom (like healthchecks' `sendalerts`): take the next round of
deliveries from the broker, judge each once, apply the good replies together
(`services.apply_replies`), dead-letter the rest, ack or put back each, then tick (heartbeat,
metrics, dead-letter filing, deadlines, outbox relay). The broker module only connects,
declares, publishes and yields rounds; the saga policy is here:

- Every delivery ends applied, ignored or dead-lettered with a reason. Only an outage puts a
  reply back: the database unreachable (the round goes back, after a pause), or the broker gone
  (the round's deliveries come back by themselves; the loop reconnects with backoff).
- Anything else that goes wrong with one reply stays with that reply: it is published again to
  the tail of the queue, at most MAX_HANDLER_TRIES times, counted in a header only we can write
  (signed), then set aside.
- During a backlog the tick runs at most every `tick_seconds`, and the deadline check at most
  every `deadline_hold_seconds` (30): the replies deadlines would give up on may be in the
  backlog, and resending for them would only grow it (with short step timeouts, a storm of
  resends); but a backlog that never ends (a flood of junk) must not hold every resend back.
- No tick while the broker is away: deadline checks would spend a command's attempts on resends
  that cannot leave, and turn a broker outage into given-up steps.
"""
import hashlib
import logging
import time

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.utils.crypto import constant_time_compare, salted_hmac

from sagas import dead_letters, health, metrics, outbox, services
from sagas.broker import (
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_REASON,
    MAX_REASON_CHARS,
    REPLIES_QUEUE,
    Backoff,
    BrokerUnavailable,
    Delivery,
    sleep_unless,
)
from sagas.replies import PoisonMessage, escaped_text, parse_reply, saga_id_of, storable_text
from sagas.runtime import Runtime
from sagas.vocabulary import ReplyFate

log = logging.getLogger(__name__)

MAX_HANDLER_TRIES = 3
TRIES_HEADER = "x-saga-handler-tries"
TRIES_SIGNATURE_HEADER = "x-saga-handler-tries-signature"
REASON_HEADER = DEAD_LETTER_REASON
OUTAGE_PAUSE_SECONDS = 1.0
RELAY_SECONDS = 1.0
POSTPONE_SECONDS = 2.0


class Outage(Exception):
    """The database does not answer: the round is not the replies' fault."""


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


class SagaConsumer:
    def __init__(self, runtime: Runtime, *, queue: str = REPLIES_QUEUE, prefetch: int = 50,
                 deadline_check_seconds: float = 0.25, tick_seconds: float = 0.2,
                 deadline_hold_seconds: float = 30.0, participant_users: dict[str, str] | None = None):
        self.runtime = runtime
        self.broker = runtime.broker
        self.queue = queue
        self.prefetch = prefetch
        self.deadline_check_seconds = deadline_check_seconds
        self.tick_seconds = tick_seconds
        self.deadline_hold_seconds = deadline_hold_seconds
        # participant -> the RabbitMQ user whose replies it may send (None: anyone may answer)
        self.participant_users = settings.PARTICIPANT_USERS if participant_users is None else participant_users
        self.stopping = False
        self.dead_lettered = 0
        self._next_tick = self._next_deadline_check = self._next_relay = 0.0
        self._last_deadline_check = time.monotonic()

    def stop(self, *_signal) -> None:
        log.info("stopping after the round in hand")
        self.stopping = True

    def run(self) -> None:
        backoff = Backoff()
        while not self.stopping:
            try:
                deliveries = self.broker.next_round(self.queue, prefetch=self.prefetch, timeout=self.tick_seconds)
                backoff.reset()
                settled, put_back = self.handle_round(deliveries)
                self.broker.ack(settled)
                self.broker.nack(put_back)
                if put_back:
                    self.pause(OUTAGE_PAUSE_SECONDS)
                # a backlog: the round filled the prefetch window (its acks let the next one come),
                # or more have arrived already
                self.tick(backlog=len(deliveries) >= self.prefetch or self.broker.pending())
            except BrokerUnavailable as error:
                self.broker.close()
                pause = backoff.next()
                log.warning("RabbitMQ unavailable, retrying in %.1fs: %r", pause, error, extra={"queue": self.queue})
                self.pause(pause)
        self.runtime.stop()
        log.info("consumer stopped", extra={"dead_lettered": self.dead_lettered})

    def pause(self, seconds: float) -> None:
        sleep_unless(lambda: self.stopping, seconds)

    def handle_round(self, deliveries: list[Delivery]) -> tuple[list[Delivery], list[Delivery]]:
        """Judge each delivery once, dead-letter those refused, apply the rest together. Returns
        the deliveries settled (to ack) and those to put back (an outage)."""
        judged = [(delivery, self.judge(delivery)) for delivery in deliveries]
        refused = [(delivery, reason) for delivery, reason in judged if isinstance(reason, str)]
        replies = [(delivery, reply) for delivery, reply in judged if not isinstance(reply, str)]
        for delivery, reason in refused:
            self.dead_letter(delivery, reason, saga_id=saga_id_of(delivery.correlation_id))
        try:
            outcomes = self.apply([reply for _, reply in replies])
        except Outage as outage:
            log.warning("replies put back: %s", outage, extra={"replies": len(replies)})
            return [delivery for delivery, _ in refused], [delivery for delivery, _ in replies]
        for (delivery, reply), outcome in zip(replies, outcomes):
            self.settle(delivery, reply, outcome)
        return deliveries, []

    def judge(self, delivery: Delivery) -> services.IncomingReply | str:
        """The reply a delivery carries, if we accept it; else why not."""
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
        if not self.participant_users or handler_tries(delivery) > 0:
            # (a validly signed tries count: we published this copy again after it passed the check)
            return None
        participant = command.partition(".")[0]
        expected = self.participant_users.get(participant)
        if delivery.user_id is None or delivery.user_id != expected:
            return (f"forged: a reply to {command} must come from RabbitMQ user {expected!r} "
                    f"(PARTICIPANT_USERS), this one's user_id is {delivery.user_id!r}")
        return None

    def apply(self, replies: list[services.IncomingReply]) -> list[services.ReplyOutcome]:
        """`services.apply_replies`, telling an outage (raises Outage) from a reply that breaks
        the round: then each is applied alone, and the one that breaks gets its own error."""
        if not replies:
            return []
        try:
            return services.apply_replies(replies, runtime=self.runtime)
        except Exception as error:
            close_old_connections()
            if not _database_answers():
                raise Outage(f"database unavailable: {error!r}") from error
            if len(replies) == 1:
                return [services.ReplyOutcome(None, error=error)]
            log.warning("replies not applied together, one by one instead: %r", error, extra={"replies": len(replies)})
            return [outcome for reply in replies for outcome in self.apply([reply])]

    def settle(self, delivery: Delivery, reply: services.IncomingReply, outcome: services.ReplyOutcome) -> None:
        if outcome.error is not None:
            self.retry_or_dead_letter(delivery, outcome.error, saga_id=reply.saga_id)
        elif outcome.fate == ReplyFate.DEAD_LETTERED:
            self.dead_letter(delivery, outcome.note, saga_id=reply.saga_id)
        else:
            metrics.reply_outcome(outcome.fate, received_at=delivery.received_at)

    def retry_or_dead_letter(self, delivery: Delivery, error: Exception, *, saga_id: str | None) -> None:
        tries = handler_tries(delivery) + 1
        log.error("reply handler failed", exc_info=error,
                  extra={"saga_id": saga_id, "message_id": delivery.message_id, "tries": tries})
        if tries >= MAX_HANDLER_TRIES:
            return self.dead_letter(delivery, f"handler failed {tries} times: {error!r}", saga_id=saga_id)
        self.broker.publish(exchange="", routing_key=self.queue, body=delivery.body,
                            message_id=delivery.message_id, correlation_id=delivery.correlation_id,
                            headers={**delivery.headers, TRIES_HEADER: tries,
                                     TRIES_SIGNATURE_HEADER: _tries_signature(delivery.body, tries)})

    def dead_letter(self, delivery: Delivery, reason: str, *, saga_id: str | None) -> None:
        """Set the message aside with the reason; on its saga's timeline too, when it names one we know."""
        reason = escaped_text(reason, MAX_REASON_CHARS)
        self.broker.publish(exchange="", routing_key=DEAD_LETTER_QUEUE, body=delivery.body,
                            message_id=delivery.message_id, correlation_id=delivery.correlation_id,
                            headers={**delivery.headers, REASON_HEADER: reason})
        self.dead_lettered += 1
        metrics.reply_outcome(ReplyFate.DEAD_LETTERED)
        log.warning("reply dead-lettered", extra={"reason": reason, "message_id": delivery.message_id,
                                                   "saga_id": saga_id, "dead_lettered": self.dead_lettered})
        try:
            services.record_dead_letter(saga_id=saga_id, reason=reason, message_id=storable_text(delivery.message_id))
        except DatabaseError:  # the dead-letter queue has it; the timeline line is a courtesy
            close_old_connections()
            log.warning("dead letter not put on the timeline", extra={"saga_id": saga_id})

    def tick(self, *, backlog: bool = False) -> None:
        """Between rounds: heartbeat, metrics, dead-letter filing, deadlines, outbox relay. During
        a `backlog`, at most every tick_seconds and without the deadlines (see the module's doc)."""
        now = time.monotonic()
        if backlog and now < self._next_tick:
            return
        self._next_tick = now + self.tick_seconds
        health.loop_turned()
        metrics.sample()
        dead_letters.file_due(self.broker)
        try:
            close_old_connections()
            held_too_long = now >= self._last_deadline_check + self.deadline_hold_seconds
            if (not backlog or held_too_long) and now >= self._next_deadline_check:
                self._next_deadline_check = now + self.deadline_check_seconds
                self._last_deadline_check = now
                self.check_deadlines()
            if now >= self._next_relay:
                self._next_relay = now + RELAY_SECONDS
                self.relay()
        except (DatabaseError, services.ConcurrentChange) as error:
            close_old_connections()
            log.warning("deadline check or relay postponed: %r", error)
            self._next_deadline_check = self._next_relay = now + POSTPONE_SECONDS
        except Exception:
            log.exception("deadline check or relay failed; trying again shortly")
            self._next_deadline_check = self._next_relay = now + POSTPONE_SECONDS

    def check_deadlines(self) -> None:
        services.handle_due_timeouts(runtime=self.runtime)

    def relay(self) -> None:
        outbox.relay_pending(broker=self.broker)


def _database_answers() -> bool:
    try:
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except DatabaseError:
        close_old_connections()
        return False
