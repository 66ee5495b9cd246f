"""Dead letters a person settles, on the real broker in the tests' vhost: filed from
saga.replies.dead into the table (acked only once filed), requeued to saga.replies or discarded,
each by a permitted person and in the admin history, from the console or the command line."""
import hashlib
import json
import uuid

import pytest
from django.contrib.admin.models import LogEntry
from django.core.exceptions import PermissionDenied
from django.core.management import CommandError, call_command
from django.db import DatabaseError
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from sagas import dead_letters, metrics, services
from sagas.broker import DEAD_LETTER_QUEUE, DEAD_LETTER_REASON, REPLIES_QUEUE, Broker, BrokerUnavailable, Delivery
from sagas.consumer import TRIES_HEADER, TRIES_SIGNATURE_HEADER
from sagas.dead_letter_models import DeadLetter
from tests.conftest import ORDER, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def broker(fresh_queues):
    broker = Broker()
    yield broker
    broker.close()


@pytest.fixture
def make_staff(make_staff):
    """Console staff: each may view dead letters, plus the named permissions."""
    return lambda username, *codenames: make_staff(username, "view_deadletter", *codenames)


def a_saga() -> str:
    saga, _ = services.start_order_saga(user_id="alice", items=ORDER["items"], currency="EUR", payment_method=None)
    return str(saga.pk)


def set_aside(broker, body: bytes, *, reason="not valid UTF-8 JSON", correlation_id=None, headers=None, message_id=None):
    broker.publish(exchange="", routing_key=DEAD_LETTER_QUEUE, body=body, correlation_id=correlation_id,
                   message_id=message_id, headers={**(headers or {}), DEAD_LETTER_REASON: reason})


def test_a_dead_letter_is_filed_with_its_saga_reason_body_and_headers_and_leaves_the_queue(broker):
    saga_id = a_saga()
    set_aside(broker, b'{"saga_id": "x"}', reason="saga_id is not a UUID string", correlation_id=saga_id,
              headers={"x-participant": "stock"}, message_id="m-1")
    assert dead_letters.file_from_queue(broker) == 0
    (row,) = DeadLetter.objects.all()
    assert (str(row.saga_id), row.reason, bytes(row.body), row.message_id, row.status) == (
        saga_id, "saga_id is not a UUID string", b'{"saga_id": "x"}', "m-1", "open")
    assert row.headers["x-participant"] == "stock"
    assert broker.drain(DEAD_LETTER_QUEUE) == []


def test_the_saga_is_found_from_the_body_when_the_correlation_id_names_none(broker):
    saga_id = a_saga()
    set_aside(broker, json.dumps({"saga_id": saga_id, "command": "nope"}).encode(), reason="unknown command 'nope'")
    dead_letters.file_from_queue(broker)
    assert str(DeadLetter.objects.get().saga_id) == saga_id


@pytest.mark.usefixtures("consumer")
def test_filing_is_off_when_its_period_is_zero(broker, settings):
    settings.DEAD_LETTER_FILE_EVERY_SECONDS = 0
    broker.publish(exchange="", routing_key=REPLIES_QUEUE, body=b"not json", message_id="m-stays")
    (dead,) = wait_for(lambda: broker.drain(DEAD_LETTER_QUEUE), timeout=15, what="the dead letter")
    assert dead.message_id == "m-stays" and not DeadLetter.objects.exists()


def test_an_unknown_saga_is_not_linked(broker):
    set_aside(broker, b"{}", correlation_id=str(uuid.uuid4()))
    dead_letters.file_from_queue(broker)
    assert DeadLetter.objects.get().saga_id is None


def test_a_message_whose_row_cannot_be_committed_stays_in_the_queue(broker, monkeypatch):
    set_aside(broker, b"poison")

    def refuse(**_fields):
        raise DatabaseError("database away")

    monkeypatch.setattr(DeadLetter.objects, "create", refuse)
    with pytest.raises(DatabaseError):
        dead_letters.file_from_queue(broker)
    monkeypatch.undo()
    assert not DeadLetter.objects.exists()
    assert [d.body for d in broker.drain(DEAD_LETTER_QUEUE)] == [b"poison"]


def test_filing_takes_at_most_the_limit_and_reports_what_is_left(broker):
    for number in range(5):
        set_aside(broker, str(number).encode())
    assert dead_letters.file_from_queue(broker, limit=3) == 2
    assert sorted(bytes(row.body) for row in DeadLetter.objects.all()) == [b"0", b"1", b"2"]


def test_a_redelivered_message_already_filed_and_open_gets_no_second_row(broker):
    set_aside(broker, b"poison", message_id="m-2")
    (delivery,) = broker.drain(DEAD_LETTER_QUEUE)
    assert dead_letters.file_delivery(delivery) is not None
    assert dead_letters.file_delivery(delivery) is None
    assert DeadLetter.objects.count() == 1


header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text() | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=st.dictionaries(st.text(max_size=20), header_values, max_size=5), body=st.binary(max_size=200),
       reason=st.text(max_size=50), message_id=st.none() | st.text(max_size=300),
       correlation_id=st.none() | st.text(max_size=80), timestamp=st.none() | st.integers(-2**40, 2**40))
def test_any_dead_letter_can_be_filed(headers, body, reason, message_id, correlation_id, timestamp):
    """Whatever a sender put in the message, filing it never fails on storage (NUL, lone
    surrogates, NaN, bytes, huge timestamps): a row is committed and the body kept byte for byte."""
    delivery = Delivery(body=body, routing_key=DEAD_LETTER_QUEUE, message_id=message_id,
                                  correlation_id=correlation_id, reply_to=None, redelivered=False,
                                  headers={**headers, DEAD_LETTER_REASON: reason}, timestamp=timestamp)
    row = dead_letters.file_delivery(delivery) or DeadLetter.objects.filter(body_sha256=dead_letters.hashlib.sha256(
        body).hexdigest()).latest("id")
    row.refresh_from_db()
    assert bytes(row.body) == body


def filed(broker, body=b'{"saga_id": "bad"}', **options) -> DeadLetter:
    set_aside(broker, body, **options)
    dead_letters.file_from_queue(broker)
    return DeadLetter.objects.latest("id")


def test_requeue_sends_the_body_back_to_saga_replies_without_our_headers(broker, make_staff):
    row = filed(broker, correlation_id="c-1", message_id="m-3",
                headers={TRIES_HEADER: 2, TRIES_SIGNATURE_HEADER: "sig", "x-participant": "stock"})
    person = make_staff("support", "requeue_deadletter")
    settled = dead_letters.settle_by(user=person, action="requeue", dead_letter_id=row.pk, note="participant fixed it")
    (delivery,) = wait_for(lambda: broker.drain(REPLIES_QUEUE), timeout=5, what="the requeued reply")
    assert (delivery.body, delivery.message_id, delivery.correlation_id) == (b'{"saga_id": "bad"}', "m-3", "c-1")
    assert delivery.headers == {"x-participant": "stock"}
    assert (settled.status, settled.settled_by, settled.note) == ("requeued", "support", "participant fixed it")
    entry = LogEntry.objects.get(object_id=str(row.pk))
    assert entry.user == person and "Requeued" in entry.change_message and "participant fixed it" in entry.change_message


def test_a_dead_letter_is_settled_once(broker, make_staff):
    row = filed(broker)
    person = make_staff("support", "requeue_deadletter", "discard_deadletter")
    dead_letters.settle_by(user=person, action="discard", dead_letter_id=row.pk, note="test message")
    with pytest.raises(dead_letters.NotOpen, match="discarded by support"):
        dead_letters.settle_by(user=person, action="requeue", dead_letter_id=row.pk)
    assert broker.drain(REPLIES_QUEUE) == []


def test_without_the_permission_nothing_happens(broker, make_staff):
    row = filed(broker)
    with pytest.raises(PermissionDenied):
        dead_letters.settle_by(user=make_staff("viewer", "discard_deadletter"), action="requeue", dead_letter_id=row.pk)
    row.refresh_from_db()
    assert row.status == "open" and not LogEntry.objects.exists()


def test_a_requeue_the_broker_does_not_take_leaves_the_row_open(broker, make_staff, settings):
    row = filed(broker)
    settings.RABBITMQ = {**settings.RABBITMQ, "port": 1}  # nothing listens there
    with pytest.raises(BrokerUnavailable):
        dead_letters.settle_by(user=make_staff("support", "requeue_deadletter"), action="requeue", dead_letter_id=row.pk)
    row.refresh_from_db()
    assert row.status == "open"


def test_the_running_consumer_files_what_it_dead_letters(saga_stack, broker, settings):
    settings.DEAD_LETTER_FILE_EVERY_SECONDS = 0.5
    before = metrics.REPLIES.labels("dead_lettered")._value.get()
    broker.publish(exchange="", routing_key=REPLIES_QUEUE, body=b"not json", message_id="m-poison")
    row = wait_for(lambda: DeadLetter.objects.filter(message_id="m-poison").first(), timeout=15, what="the filed row")
    assert row.reason.startswith("not valid UTF-8 JSON")
    assert metrics.REPLIES.labels("dead_lettered")._value.get() == before + 1


# the console

@pytest.fixture
def open_letter(broker):
    return filed(broker, correlation_id=a_saga())


def test_the_console_lists_dead_letters_with_reason_saga_link_and_body(client, make_staff, open_letter):
    client.force_login(make_staff("viewer"))
    page = client.get("/admin/sagas/deadletter/").content.decode()
    assert "not valid UTF-8 JSON" in page and f"/admin/sagas/saga/{open_letter.saga_id}/change/" in page
    assert "{&quot;saga_id&quot;: &quot;bad&quot;}" in page
    detail = client.get(f"/admin/sagas/deadletter/{open_letter.pk}/change/").content.decode()
    assert "dead-letter-requeue-link" not in detail  # a viewer is offered no action


def test_a_permitted_person_requeues_from_the_console(client, make_staff, open_letter, broker):
    client.force_login(make_staff("support", "requeue_deadletter"))
    detail = client.get(f"/admin/sagas/deadletter/{open_letter.pk}/change/").content.decode()
    assert "dead-letter-requeue-link" in detail and "dead-letter-discard-link" not in detail
    response = client.post(f"/admin/sagas/deadletter/{open_letter.pk}/requeue/", {"reason": "fixed upstream"})
    assert response.status_code == 302
    open_letter.refresh_from_db()
    assert (open_letter.status, open_letter.settled_by) == ("requeued", "support")
    assert len(wait_for(lambda: broker.drain(REPLIES_QUEUE), timeout=5, what="the requeued reply")) == 1


def test_the_console_refuses_an_action_without_its_permission(client, make_staff, open_letter):
    client.force_login(make_staff("support", "requeue_deadletter"))
    assert client.post(f"/admin/sagas/deadletter/{open_letter.pk}/discard/", {"reason": "x"}).status_code == 403
    open_letter.refresh_from_db()
    assert open_letter.status == "open"


# the command line

def test_the_command_lists_shows_and_discards(capsys, make_staff, open_letter):
    make_staff("support", "discard_deadletter")
    call_command("dead_letters", "list")
    assert f"{open_letter.pk}\t" in capsys.readouterr().out
    call_command("dead_letters", "show", str(open_letter.pk))
    shown = json.loads(capsys.readouterr().out)
    assert (shown["body"], shown["reason"], shown["status"]) == ('{"saga_id": "bad"}', "not valid UTF-8 JSON", "open")
    call_command("dead_letters", "discard", str(open_letter.pk), "--user", "support", "--reason", "a test")
    open_letter.refresh_from_db()
    assert (open_letter.status, open_letter.settled_by) == ("discarded", "support")
    assert LogEntry.objects.filter(object_id=str(open_letter.pk), user__username="support").exists()


def test_the_command_refuses_an_unknown_user_or_a_missing_permission(make_staff, open_letter):
    make_staff("viewer")
    with pytest.raises(CommandError, match="no user"):
        call_command("dead_letters", "requeue", str(open_letter.pk), "--user", "nobody", "--reason", "x")
    with pytest.raises(CommandError, match="lacks the permission"):
        call_command("dead_letters", "requeue", str(open_letter.pk), "--user", "viewer", "--reason", "x")


def test_prune_deletes_only_settled_dead_letters_past_the_age(capsys, make_staff, broker):
    settled, kept = filed(broker, body=b"1"), filed(broker, body=b"2")
    dead_letters.settle_by(user=make_staff("support", "discard_deadletter"), action="discard", dead_letter_id=settled.pk)
    DeadLetter.objects.filter(pk=settled.pk).update(settled_at=settled.filed_at.replace(year=2000))
    call_command("dead_letters", "prune", "--settled-before", "30d")
    assert "would delete 1" in capsys.readouterr().out and DeadLetter.objects.count() == 2
    call_command("dead_letters", "prune", "--settled-before", "30d", "--execute")
    assert list(DeadLetter.objects.values_list("pk", flat=True)) == [kept.pk]


def test_of_a_body_over_the_size_limit_only_the_start_is_kept_and_it_can_only_be_discarded(broker):
    """Found in review: filing kept any body whole (a 100 MB reply in the consumer's memory, the
    database and the console page). Such a body is poison whatever it holds."""
    huge = b"[" + b"1," * 500_000 + b"1]"
    set_aside(broker, huge, reason="body of 1000002 bytes is over the 65536 byte limit")
    dead_letters.file_from_queue(broker)
    row = DeadLetter.objects.get()
    assert bytes(row.body) == huge[:65536] and row.body_sha256 == hashlib.sha256(huge).hexdigest()
    assert row.headers[dead_letters.TRUNCATED] == f"{len(huge)} bytes; the first 65536 are kept"
    with pytest.raises(dead_letters.NotOpen, match="Discard it"):
        dead_letters.requeue_dead_letter(dead_letter_id=row.pk, actor="ana", broker=broker)
    assert DeadLetter.objects.get().status == DeadLetter.Status.OPEN
    assert broker.drain(REPLIES_QUEUE) == []
    dead_letters.discard_dead_letter(dead_letter_id=row.pk, actor="ana", note="too big")
    assert DeadLetter.objects.get().status == DeadLetter.Status.DISCARDED
