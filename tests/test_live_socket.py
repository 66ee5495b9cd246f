"""The admin's live socket: who may open it, and that it closes when the login behind it ends."""
import time

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from sagas import live, live_socket, runtime, services
from tests.conftest import ORDER

pytestmark = pytest.mark.django_db(transaction=True)


def logged_in(user) -> Client:
    browser = Client()
    browser.force_login(user)
    return browser


def socket(browser: Client | None, path="/ws/sagas/"):
    from orchestration_site.asgi import application

    headers = [(b"origin", b"http://localhost"), (b"host", b"localhost")]
    if browser is not None:
        headers.append((b"cookie", f"sessionid={browser.cookies['sessionid'].value}".encode()))
    return WebsocketCommunicator(application, path, headers=headers)


def a_state():
    saga, _ = services.start_order_saga(user_id="alice", items=ORDER["items"], currency="EUR", payment_method=None)
    return services.load_saga_state(str(saga.pk))


def knock(browser) -> tuple:
    async def run():
        communicator = socket(browser)
        outcome = await communicator.connect(timeout=5)
        await communicator.disconnect()
        return outcome
    return async_to_sync(run)()


def test_staff_with_the_view_permission_may_open_it(make_staff, fresh_redis):
    assert knock(logged_in(make_staff("viewer", "view_saga"))) == (True, None)


@pytest.mark.parametrize(
    "who",
    ["staff without view_saga", "view_saga but not staff", "inactive", "anonymous"],
)
def test_anyone_else_is_refused(make_staff, fresh_redis, who):
    browser = None
    if who == "staff without view_saga":
        browser = logged_in(make_staff("nosy", "change_saga"))
    elif who == "view_saga but not staff":
        browser = logged_in(make_staff("customer", "view_saga", is_staff=False))
    elif who == "inactive":
        user = make_staff("gone", "view_saga")
        browser = logged_in(user)
        user.is_active = False
        user.save()
    assert knock(browser) == (False, live_socket.FORBIDDEN)


def test_logging_out_closes_the_socket_at_once(make_staff, fresh_redis):
    browser = logged_in(make_staff("viewer", "view_saga"))

    async def run():
        communicator = socket(browser)
        connected, _ = await communicator.connect(timeout=5)
        assert connected
        await sync_to_async(browser.logout)()
        closed = await communicator.receive_output(timeout=5)
        await communicator.wait()
        return closed

    assert async_to_sync(run)() == {"type": "websocket.close", "code": live_socket.FORBIDDEN}


def test_a_session_that_ended_otherwise_closes_the_socket_at_the_next_notice(make_staff, fresh_redis, monkeypatch):
    browser = logged_in(make_staff("viewer", "view_saga"))
    state = a_state()
    monkeypatch.setattr(live_socket, "RECHECK_SECONDS", 0.0)

    async def run():
        communicator = socket(browser)
        connected, _ = await communicator.connect(timeout=5)
        assert connected
        runtime.current().live.saga_changed(state)
        first = await communicator.receive_json_from(timeout=5)
        # the session expires or is deleted without a logout: no signal tells the socket
        await sync_to_async(browser.session.delete)()
        runtime.current().live.saga_changed(state)
        closed = await communicator.receive_output(timeout=5)
        await communicator.wait()
        return first, closed

    first, closed = async_to_sync(run)()
    assert first["type"] == "saga.progress"
    assert closed == {"type": "websocket.close", "code": live_socket.FORBIDDEN}


def test_a_revoked_permission_closes_the_socket_at_the_next_notice(make_staff, fresh_redis, monkeypatch):
    user = make_staff("viewer", "view_saga")
    browser = logged_in(user)
    state = a_state()
    monkeypatch.setattr(live_socket, "RECHECK_SECONDS", 0.0)

    async def run():
        communicator = socket(browser)
        assert (await communicator.connect(timeout=5))[0]
        await sync_to_async(user.user_permissions.clear)()
        runtime.current().live.saga_changed(state)
        closed = await communicator.receive_output(timeout=5)
        await communicator.wait()
        return closed

    assert async_to_sync(run)() == {"type": "websocket.close", "code": live_socket.FORBIDDEN}


def test_notices_keep_flowing_while_the_session_is_valid(make_staff, fresh_redis, monkeypatch):
    browser = logged_in(make_staff("viewer", "view_saga"))
    state = a_state()
    monkeypatch.setattr(live_socket, "RECHECK_SECONDS", 0.0)

    async def run():
        communicator = socket(browser, f"/ws/sagas/{state.saga_id}/")
        assert (await communicator.connect(timeout=5))[0]
        received = []
        for _ in range(3):
            runtime.current().live.saga_changed(state)
            received.append(await communicator.receive_json_from(timeout=5))
        await communicator.disconnect()
        return received

    assert [m["saga_id"] for m in async_to_sync(run)()] == [state.saga_id] * 3


def test_a_sagas_page_hears_of_its_saga_only_and_the_list_of_every_one(make_staff, fresh_redis):
    browser = logged_in(make_staff("viewer", "view_saga"))
    watched, other = a_state(), a_state()
    time.sleep(5 * live.BATCH_SECONDS)  # the notices of their start have gone out

    async def run():
        page, listing = socket(browser, f"/ws/sagas/{watched.saga_id}/"), socket(browser)
        assert (await page.connect(timeout=5))[0] and (await listing.connect(timeout=5))[0]
        runtime.current().live.saga_changed(other)
        heard_by_list = await listing.receive_json_from(timeout=5)
        page_silent = await page.receive_nothing(timeout=0.5)
        runtime.current().live.saga_changed(watched)
        heard_by_page = await page.receive_json_from(timeout=5)
        await page.disconnect()
        await listing.disconnect()
        return heard_by_list, page_silent, heard_by_page

    heard_by_list, page_silent, heard_by_page = async_to_sync(run)()
    assert heard_by_list == {"type": "saga.progress", "saga_id": other.saga_id}
    assert page_silent
    assert heard_by_page == {"type": "saga.progress", "saga_id": watched.saga_id}
