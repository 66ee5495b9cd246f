"""The support console: the saga list, the saga page, the staff actions and the live socket.

Sagas are moved through sagas.services (the path the consumer takes), so every state here is one
the real service reaches; the last test drives a real saga through the broker and participants.
"""
import io
import re
import time
import uuid
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.contrib.admin.models import LogEntry
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from sagas import runtime, services
from sagas.engine import Reply
from sagas.models import OutboxMessage, Saga, TimelineEntry
from tests.conftest import ORDER, finished

pytestmark = pytest.mark.django_db

LIST_URL = reverse("admin:sagas_saga_changelist")
ACTION_PERMISSIONS = {"compensate": "compensate_saga", "retry": "retry_saga", "resume": "resume_saga",
                      "mark-compensated": "mark_step_compensated"}


# people

@pytest.fixture
def make_staff(make_staff):
    """Console staff: each may view sagas, plus the named permissions."""
    return lambda username, *codenames: make_staff(username, "view_saga", *codenames)


@pytest.fixture
def viewer(client, make_staff):
    """Support staff who may look at sagas but not act on them."""
    client.force_login(make_staff("viewer"))
    return client


@pytest.fixture
def support(client, make_staff):
    """Support staff with every saga action."""
    client.force_login(make_staff("support", *ACTION_PERMISSIONS.values()))
    return client


# sagas, moved by the same services the consumer calls

def start_saga(user_id="alice", payment_method="pm-123"):
    saga, _ = services.start_order_saga(user_id=user_id, items=ORDER["items"], currency="EUR",
                                        payment_method=payment_method)
    return str(saga.pk)


def reply(saga_id, command, status="success", reason=None, **data):
    attempt = services.load_saga_state(saga_id).awaiting.attempt
    services.apply_replies([services.IncomingReply(saga_id, Reply(command, attempt, status, reason, data))])


def completed_saga(user_id="alice", order_id=None):
    saga_id = start_saga(user_id)
    reply(saga_id, "stock.reduce", total="19.98")
    reply(saga_id, "payment.take")
    reply(saga_id, "order.create", order_id=order_id or f"o-{uuid.uuid4().hex[:8]}")
    return saga_id


def declined_saga():
    """Payment declined, stock restored: compensated with the reason payment_declined."""
    saga_id = start_saga(payment_method="pm-declined")
    reply(saga_id, "stock.reduce", total="19.98")
    reply(saga_id, "payment.take", "failure", "payment_declined")
    reply(saga_id, "stock.restore")
    return saga_id


@pytest.fixture
def failed_saga(settings):
    """Payment declined, and the stock service would not restore the stock: staff must act."""
    settings.SAGA_COMPENSATION_MAX_ATTEMPTS = 1
    saga_id = start_saga(payment_method="pm-declined")
    reply(saga_id, "stock.reduce", total="19.98")
    reply(saga_id, "payment.take", "failure", "payment_declined")
    reply(saga_id, "stock.restore", "failure", "warehouse_closed")
    assert Saga.objects.get(pk=saga_id).status == "failed"
    return saga_id


def saga_page(saga_id):
    return reverse("admin:sagas_saga_change", args=[saga_id])


def action_url(saga_id, slug):
    return f"{saga_page(saga_id).removesuffix('change/')}{slug}/"


def messages_of(response):
    return [str(message) for message in response.context["messages"]]


def staff_entries(saga_id):
    return list(TimelineEntry.objects.filter(saga_id=saga_id, kind="staff"))


# the list

def test_list_shows_the_columns_and_counts_per_status_and_step(viewer):
    start_saga("alice")
    start_saga("bob")
    completed_saga("carol")
    response = viewer.get(LIST_URL)
    assert response.status_code == 200
    cl = response.context["cl"]
    assert [(status, count) for status, count, _ in cl.status_counts] == [
        ("running", 2), ("compensating", 0), ("completed", 1), ("compensated", 0), ("failed", 0)]
    assert [(step, count) for step, count, _ in cl.step_counts] == [
        ("reduce_stock", 2), ("take_payment", 0), ("create_order", 0), ("none (finished)", 1)]
    headers = [(header["text"], header["sortable"]) for header in response.context["result_headers"]]
    assert headers == [("saga", False), ("status", False), ("current step", False), ("customer", False),
                       ("total", False), ("age", True), ("last change", True)]
    html = response.content.decode()
    assert "19.98 EUR" in html and 'data-count="status-running">running <b>2</b>' in html


def test_list_queries_do_not_grow_with_the_number_of_sagas(viewer):
    start_saga()
    with CaptureQueriesContext(connection) as few:
        viewer.get(LIST_URL)
    for _ in range(15):
        start_saga()
    with CaptureQueriesContext(connection) as many:
        viewer.get(LIST_URL)
    assert len(many) == len(few)
    counting = [q["sql"] for q in many.captured_queries if "COUNT(" in q["sql"]]
    assert len(counting) == 1 and "GROUP BY" in counting[0]  # counts per status and step, and the total, at once
    assert not any('"state"' in q["sql"] for q in many.captured_queries)  # the JSON state is not read


def test_seeded_sagas_for_the_scale_measurement_are_ones_the_console_can_show(viewer):
    call_command("seed_sagas", count=300, stdout=io.StringIO())
    cl = viewer.get(LIST_URL).context["cl"]
    assert cl.result_count == 300 == sum(count for _, count, _ in cl.status_counts)
    for status in ("running", "failed"):
        saga = Saga.objects.filter(status=status).first()
        assert viewer.get(saga_page(saga.pk)).status_code == 200


def listed(client, **params):
    response = client.get(LIST_URL, params)
    assert response.status_code == 200
    return {str(saga.pk) for saga in response.context["cl"].result_list}


def test_filters_by_status_step_and_customer(viewer):
    running, done = start_saga("alice"), completed_saga("bob")
    assert listed(viewer, status__exact="completed") == {done}
    assert listed(viewer, step="reduce_stock") == {running}
    assert listed(viewer, step="take_payment") == set()
    assert listed(viewer, user_id="bob") == {done}


def test_age_filter(viewer):
    fresh, old = start_saga(), start_saga()
    Saga.objects.filter(pk=old).update(created_at=timezone.now() - timedelta(days=3))
    assert listed(viewer, age="hour") == {fresh}
    assert listed(viewer, age="today") == {fresh}
    assert listed(viewer, age="day_plus") == {old}


def test_stuck_filter_finds_overdue_and_failed_sagas(viewer, failed_saga):
    on_time, overdue = start_saga(), start_saga()
    completed_saga()
    Saga.objects.filter(pk=overdue).update(deadline=timezone.now() - timedelta(minutes=5))
    assert listed(viewer, stuck="yes") == {overdue, failed_saga}
    assert on_time not in listed(viewer, stuck="yes")


def test_search_is_exact_on_saga_id_user_id_and_order_id(viewer):
    alice, bob = completed_saga("alice", order_id="o-77"), start_saga("bob")
    assert listed(viewer, q=bob) == {bob}
    assert listed(viewer, q="alice") == {alice}
    assert listed(viewer, q="o-77") == {alice}
    assert listed(viewer, q="ali") == set()  # exact, not icontains
    assert listed(viewer, q=bob[:8]) == set()


def listed_in_order(client, **params):
    return [str(saga.pk) for saga in client.get(LIST_URL, params).context["cl"].result_list]


def test_list_sorts_by_age_and_last_change(viewer):
    first, second = start_saga(), start_saga()
    Saga.objects.filter(pk=first).update(updated_at=timezone.now() + timedelta(minutes=1))
    assert listed_in_order(viewer) == [second, first]  # newest first by default
    age, last_change = 5, 6  # positions in list_display
    assert listed_in_order(viewer, o=f"-{last_change}") == [first, second]
    assert listed_in_order(viewer, o=str(age)) == [first, second]


def test_sagas_cannot_be_added_deleted_or_edited(support, make_staff, client):
    saga_id = completed_saga()
    client.force_login(make_staff("boss", *ACTION_PERMISSIONS.values(), "add_saga", "change_saga", "delete_saga"))
    assert client.get(reverse("admin:sagas_saga_add")).status_code == 403
    assert client.get(reverse("admin:sagas_saga_delete", args=[saga_id])).status_code == 403
    assert client.post(saga_page(saga_id), {"status": "compensated"}).status_code == 403
    listing = client.get(LIST_URL)
    assert listing.context["action_form"] is None  # no bulk delete
    assert 'name="_save"' not in client.get(saga_page(saga_id)).content.decode()
    assert Saga.objects.get(pk=saga_id).status == "completed"


# the saga page

def test_saga_page_shows_the_diagram_timeline_failure_sentence_and_links(viewer):
    saga_id = declined_saga()
    other = completed_saga("alice", order_id="o-1")
    Saga.objects.filter(pk=saga_id).update(order_id="o-1")  # a second saga for the same order
    response = viewer.get(saga_page(saga_id))
    assert response.status_code == 200
    html = response.content.decode()
    steps = response.context["diagram"]
    assert [(s.definition.name, s.state.status) for s in steps] == [
        ("reduce_stock", "compensated"), ("take_payment", "failed"), ("create_order", "pending")]
    assert "saga-undo-row" in html and "stock.restore" in html  # the compensation arrows
    assert "The customer&#x27;s payment was declined" in html
    kinds = [(e.kind, e.command) for e in response.context["timeline"]]
    assert kinds == [("started", ""), ("command", "stock.reduce"), ("reply", "stock.reduce"),
                     ("command", "payment.take"), ("reply", "payment.take"), ("command", "stock.restore"),
                     ("reply", "stock.restore"), ("event", "saga.compensated")]
    assert f"{LIST_URL}?user_id=alice" in html
    assert saga_page(other) in html


def test_saga_page_of_a_failed_saga_shows_where_undoing_gave_up(viewer, failed_saga):
    response = viewer.get(saga_page(failed_saga))
    assert [step.undo for step in response.context["diagram"]] == ["gave up after 1 attempt", None, None]
    assert "Undoing the order got stuck at putting the stock back" in response.context["failure_sentence"]


def test_saga_page_highlights_the_current_step_and_marks_ignored_replies(viewer):
    saga_id = start_saga()
    reply(saga_id, "stock.reduce", total="19.98")
    services.apply_replies([services.IncomingReply(saga_id, Reply("stock.reduce", 1, "success", None, {"total": "19.98"}),
                                                   redelivered=True)])
    response = viewer.get(saga_page(saga_id))
    (current,) = [s for s in response.context["diagram"] if s.current]
    assert current.definition.name == "take_payment"
    html = response.content.decode()
    assert 'saga-step saga-step-running is-current" data-step="take_payment"' in html
    assert "duplicate ignored" in html and "redelivered" in html


@pytest.mark.parametrize(("reason", "sentence"), [
    ("out_of_stock", "out of stock"),
    ("reduce_stock_timed_out", "never answered"),
    ("compensated by staff: customer called", "A staff member undid the order, giving the reason: “customer called”"),
    ("payment.refund did not succeed: no success after 10 attempts", "refunding the payment"),
    ("something_new", "“something_new”"),
])
def test_failure_reasons_are_told_in_plain_words(viewer, reason, sentence):
    saga_id = start_saga()
    Saga.objects.filter(pk=saga_id).update(failure_reason=reason)
    assert sentence in viewer.get(saga_page(saga_id)).context["failure_sentence"]


# the actions

@pytest.mark.parametrize("slug", ACTION_PERMISSIONS)
def test_each_action_needs_its_own_permission(client, make_staff, slug):
    saga_id = start_saga()
    others = [codename for name, codename in ACTION_PERMISSIONS.items() if name != slug]
    client.force_login(make_staff("partial", *others))
    assert client.get(action_url(saga_id, slug)).status_code == 403
    assert client.post(action_url(saga_id, slug), {"reason": "r", "step_name": "reduce_stock"}).status_code == 403
    assert f'data-action="{slug}"' not in client.get(saga_page(saga_id)).content.decode()
    assert not LogEntry.objects.exists() and not staff_entries(saga_id)


@pytest.mark.parametrize("slug", ACTION_PERMISSIONS)
def test_each_action_asks_for_a_reason(support, slug, request):
    # a saga whose state allows the action: a running one, or one whose compensation failed
    saga_id = request.getfixturevalue("failed_saga") if slug in ("resume", "mark-compensated") else start_saga()
    assert f'data-action="{slug}"' in support.get(saga_page(saga_id)).content.decode()
    page = support.get(action_url(saga_id, slug))
    assert page.status_code == 200 and 'name="reason"' in page.content.decode()
    without = support.post(action_url(saga_id, slug), {"reason": "  ", "step_name": "reduce_stock",
                                                       "version": services.load_saga_state(saga_id).version})
    assert without.status_code == 200 and without.context["form"].errors["reason"]
    assert not LogEntry.objects.exists() and not staff_entries(saga_id)


def test_compensate_shows_the_plan_then_sends_it(support):
    saga_id = completed_saga(order_id="o-9")
    page = support.get(action_url(saga_id, "compensate"))
    plan = [(command.command, summary) for command, summary, _ in page.context["plan"]]
    assert plan == [("order.cancel", "2 × sku-1; 19.98 EUR; order o-9"), ("payment.refund", "19.98 EUR"),
                    ("stock.restore", "2 × sku-1")]
    assert Saga.objects.get(pk=saga_id).status == "completed"  # nothing sent by looking

    response = support.post(action_url(saga_id, "compensate"),
                            {"reason": "customer cancelled by phone", "version": page.context["form"]["version"].value()},
                            follow=True)
    assert response.redirect_chain[-1][0] == saga_page(saga_id)
    saga = Saga.objects.get(pk=saga_id)
    assert (saga.status, saga.failure_reason) == ("compensating", "compensated by staff: customer cancelled by phone")
    (staff,) = staff_entries(saga_id)
    assert (staff.actor, staff.reason) == ("support", "customer cancelled by phone")
    (entry,) = LogEntry.objects.filter(object_id=saga_id)
    assert "support" in entry.change_message and "customer cancelled by phone" in entry.change_message
    assert "order.cancel (attempt 1)" in entry.change_message and '"order_id": "o-9"' in entry.change_message
    assert any("now compensating" in m for m in messages_of(response))


def test_compensate_asks_again_when_the_saga_moved_after_the_plan_was_shown(support):
    saga_id = start_saga()
    shown = support.get(action_url(saga_id, "compensate")).context["form"]["version"].value()
    reply(saga_id, "stock.reduce", total="19.98")  # the consumer moves the saga meanwhile
    response = support.post(action_url(saga_id, "compensate"), {"reason": "r", "version": shown})
    assert response.status_code == 200
    assert [c.command for c, _, _ in response.context["plan"]] == ["payment.refund", "stock.restore"]
    assert any("moved on" in m for m in messages_of(response))
    assert Saga.objects.get(pk=saga_id).status == "running" and not LogEntry.objects.exists()


def test_retry_sends_the_awaited_command_again(support):
    saga_id = start_saga()
    response = support.post(action_url(saga_id, "retry"), {"reason": "stock service was restarted"})
    assert response.status_code == 302
    commands = list(TimelineEntry.objects.filter(saga_id=saga_id, kind="command").values_list("command", "attempt"))
    assert commands == [("stock.reduce", 1), ("stock.reduce", 2)]
    (entry,) = LogEntry.objects.filter(object_id=saga_id)
    assert "Retry now by support" in entry.change_message and "stock.reduce (attempt 2)" in entry.change_message


def test_resume_restarts_a_failed_compensation(support, failed_saga):
    support.post(action_url(failed_saga, "resume"), {"reason": "warehouse is open again"})
    state = services.load_saga_state(failed_saga)
    assert state.status == "compensating" and (state.awaiting.command, state.awaiting.attempt) == ("stock.restore", 2)
    (entry,) = LogEntry.objects.filter(object_id=failed_saga)
    assert "warehouse is open again" in entry.change_message and "stock.restore (attempt 2)" in entry.change_message


def test_marking_the_last_owed_step_compensated_ends_the_saga(support, failed_saga):
    form = support.get(action_url(failed_saga, "mark-compensated")).context["form"]
    assert [name for name, _ in form.fields["step_name"].choices] == ["reduce_stock", "take_payment", "create_order"]
    support.post(action_url(failed_saga, "mark-compensated"),
                 {"reason": "restocked by hand", "step_name": "reduce_stock"})
    saga = Saga.objects.get(pk=failed_saga)
    assert saga.status == "compensated"
    assert saga.engine_state().step("reduce_stock").status == "compensated"
    (entry,) = LogEntry.objects.filter(object_id=failed_saga)
    assert "(step reduce_stock)" in entry.change_message and "event saga.compensated" in entry.change_message


def gave_up_unanswered(settings):
    """Payment declined; stock.restore was sent and never answered: the saga failed."""
    settings.SAGA_COMPENSATION_MAX_ATTEMPTS, settings.SAGA_STEP_TIMEOUT_SECONDS = 1, 0.01
    saga_id = start_saga(payment_method="pm-declined")
    reply(saga_id, "stock.reduce", total="19.98")
    reply(saga_id, "payment.take", "failure", "payment_declined")
    time.sleep(0.05)
    services.handle_timeout(saga_id=saga_id)
    assert Saga.objects.get(pk=saga_id).status == "failed"
    return saga_id


def events_of(saga_id):
    return list(OutboxMessage.objects.filter(saga_id=saga_id, exchange="saga.events").order_by("id")
                .values_list("routing_key", flat=True))


def test_a_late_undo_success_heals_a_failed_saga(settings):
    saga_id = gave_up_unanswered(settings)
    services.apply_replies([services.IncomingReply(saga_id, Reply("stock.restore", 1, "success"))])
    saga = Saga.objects.get(pk=saga_id)
    assert (saga.status, saga.failure_reason) == ("compensated", "payment_declined")
    assert events_of(saga_id) == ["saga.failed", "saga.compensated"]
    late = saga.timeline.get(kind="reply", command="stock.restore")
    assert late.applied and "after the saga failed" in late.note


def test_marking_a_step_with_an_undo_outstanding_shows_it_then_flags_a_second_undo(support, settings):
    saga_id = gave_up_unanswered(settings)
    page = support.get(action_url(saga_id, "mark-compensated"))
    table = re.search(r'<table class="saga-plan" id="saga-outstanding">.*?</table>', page.content.decode(), re.S)[0]
    assert "stock.restore" in table and "<td>1</td>" in table and " ago</span>" in table
    support.post(action_url(saga_id, "mark-compensated"), {"reason": "restocked by hand", "step_name": "reduce_stock"})
    assert Saga.objects.get(pk=saga_id).status == "compensated"

    services.apply_replies([services.IncomingReply(saga_id, Reply("stock.restore", 1, "success"))])
    assert events_of(saga_id) == ["saga.failed", "saga.compensated", "saga.undone_twice"]
    flagged = OutboxMessage.objects.get(saga_id=saga_id, routing_key="saga.undone_twice").body
    assert (flagged["step"], flagged["command"], flagged["status"]) == ("reduce_stock", "stock.restore", "compensated")
    assert "undone twice: check with stock" in support.get(saga_page(saga_id)).content.decode()
    assert TimelineEntry.objects.get(saga_id=saga_id, kind="reply", command="stock.restore").note == \
        "undone twice: check with stock"


def test_retry_now_with_the_attempts_spent_sends_once_more_instead_of_undoing(support, settings):
    settings.SAGA_STEP_MAX_ATTEMPTS = 1
    saga_id = start_saga()
    support.post(action_url(saga_id, "retry"), {"reason": "stock service is back"})
    state = services.load_saga_state(saga_id)
    assert state.status == "running" and (state.awaiting.command, state.awaiting.attempt) == ("stock.reduce", 2)
    assert "granted by staff" in TimelineEntry.objects.get(saga_id=saga_id, kind="staff").note


@pytest.mark.parametrize(("slug", "data", "sentence"), [
    ("retry", {}, "no command is awaited"),
    ("resume", {}, "Only a failed saga can resume compensation"),
    ("mark-compensated", {"step_name": "take_payment"}, "only while a saga is compensating or failed"),
])
def test_an_action_the_state_does_not_allow_is_refused_with_the_engines_sentence(support, slug, data, sentence):
    saga_id = completed_saga()
    button = re.search(rf'<a [^>]*data-action="{slug}"[^>]*>', support.get(saga_page(saga_id)).content.decode())[0]
    assert "is-refused" in button and sentence in button  # greyed out, the sentence as its tooltip
    asked = support.get(action_url(saga_id, slug), follow=True)
    assert asked.redirect_chain[-1][0] == saga_page(saga_id)
    assert any(sentence in m for m in messages_of(asked))
    response = support.post(action_url(saga_id, slug), {"reason": "r", **data}, follow=True)
    assert response.redirect_chain[-1][0] == saga_page(saga_id)
    assert any(sentence in m for m in messages_of(response))
    assert Saga.objects.get(pk=saga_id).status == "completed"
    assert not LogEntry.objects.exists() and not staff_entries(saga_id)


def test_compensating_a_compensated_saga_is_refused(support):
    saga_id = declined_saga()
    version = services.load_saga_state(saga_id).version
    response = support.post(action_url(saga_id, "compensate"), {"reason": "r", "version": version}, follow=True)
    assert any("Nothing is left to undo" in m for m in messages_of(response))
    assert not LogEntry.objects.exists()


@pytest.mark.integration
def test_compensating_a_completed_saga_from_the_admin_undoes_it_for_real(saga_stack, support, participants):
    from demo.participants import ledger_summary

    saga_id = saga_stack.create_order(ORDER).json()["saga_id"]
    assert finished(saga_id).status == "completed"
    version = support.get(action_url(saga_id, "compensate")).context["form"]["version"].value()
    support.post(action_url(saga_id, "compensate"), {"reason": "customer changed their mind", "version": version})
    saga = finished(saga_id)
    assert saga.status == "compensated"
    assert ledger_summary(participants)[saga_id] == {"stock_net": 0, "paid_net": 0, "orders_open": 0}


# the live socket

def socket_headers(user=None) -> list:
    """What a browser sends when it opens the socket: its origin and, once logged in, its session cookie."""
    headers = [(b"origin", b"http://localhost"), (b"host", b"localhost")]
    if user is not None:
        browser = Client()
        browser.force_login(user)
        headers.append((b"cookie", f"sessionid={browser.cookies['sessionid'].value}".encode()))
    return headers


def socket(path, headers):
    from orchestration_site.asgi import application

    return WebsocketCommunicator(application, path, headers=headers)


@pytest.mark.django_db(transaction=True)
def test_staff_receive_progress_of_a_saga_on_its_socket(make_staff, fresh_redis):
    saga_id = start_saga()
    state = services.load_saga_state(saga_id)

    headers = socket_headers(make_staff("watcher"))

    async def listen():
        communicator = socket(f"/ws/sagas/{saga_id}/", headers)
        connected, _ = await communicator.connect()
        assert connected
        runtime.current().live.saga_changed(state)
        message = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return message

    message = async_to_sync(listen)()
    assert message == {"type": "saga.progress", "saga_id": saga_id}  # all that live.js uses


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("who", ["anonymous", "customer"])
def test_only_staff_may_open_the_socket(django_user_model, who):
    user = None if who == "anonymous" else django_user_model.objects.create_user("carol", password="pw")

    headers = socket_headers(user)

    async def knock():
        communicator = socket("/ws/sagas/", headers)
        connected, code = await communicator.connect()
        await communicator.disconnect()
        return connected, code

    assert async_to_sync(knock)() == (False, 4403)
