"""The doors: the auth client (no redirects, no cookies, a total deadline), the API throttles,
the admin login (django-axes, password validators, session lifetime) and the offline API docs."""
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from sagas.auth import AuthClient, AuthServiceUnavailable
from sagas.models import Saga
from tests.conftest import CUSTOMER_TOKEN, OTHER_CUSTOMER_TOKEN
from tests.test_settings import start

pytestmark = pytest.mark.django_db


# auth services that misbehave, each on a port of its own

def serve(handler_class) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture
def odd_auth_service():
    servers = []

    def start_server(handler_class) -> str:
        server = serve(handler_class)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/auth/verify"

    yield start_server
    for server in servers:
        server.shutdown()
        server.server_close()


class Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list

    def answer(self, status, body: bytes, **headers):
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_redirect_is_not_followed_and_counts_as_unavailable(odd_auth_service):
    asked = []

    class Redirecting(Quiet):
        def do_GET(self):
            asked.append(self.path)
            if self.path == "/auth/verify":
                self.answer(302, b"", Location="/elsewhere")
            else:
                self.answer(200, b'{"user_id": "mallory"}')

    client = AuthClient(odd_auth_service(Redirecting), timeout=2.0)
    with pytest.raises(AuthServiceUnavailable):
        client.verify(f"Bearer {CUSTOMER_TOKEN}")
    assert asked == ["/auth/verify"]


def test_no_cookie_is_kept_between_calls(odd_auth_service):
    cookies_seen = []

    class CookieSetting(Quiet):
        def do_GET(self):
            cookies_seen.append(self.headers.get("Cookie"))
            self.answer(200, b'{"user_id": "alice"}', **{"Set-Cookie": "session=alice; Path=/"})

    client = AuthClient(odd_auth_service(CookieSetting), timeout=2.0)
    assert client.verify("Bearer a").user_id == "alice"
    assert client.verify("Bearer b").user_id == "alice"
    assert cookies_seen == [None, None]


def drip_server(*, head_first: bool) -> socket.socket:
    """Answers 200 a byte every 0.1 s: all of it (head_first=False) or only the body."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_one(connection):
        with connection:
            connection.recv(65536)
            body = b'{"user_id": "alice"}' + b" " * 200
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            try:
                if head_first:
                    connection.sendall(head)
                for byte in (body if head_first else head + body):
                    connection.sendall(bytes([byte]))
                    time.sleep(0.1)
            except OSError:
                pass  # the client gave up, as it should

    def accept():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener


@pytest.mark.parametrize("head_first", [False, True], ids=["headers-drip", "body-drips"])
def test_a_slow_drip_cannot_stretch_the_call_past_its_total_deadline(head_first):
    listener = drip_server(head_first=head_first)
    client = AuthClient(f"http://127.0.0.1:{listener.getsockname()[1]}/auth/verify", timeout=0.5)
    try:
        began = time.monotonic()
        with pytest.raises(AuthServiceUnavailable):
            client.verify("Bearer a")
        took = time.monotonic() - began
    finally:
        listener.close()
    # the drip would take about 20 s; each read alone is well inside the 0.5 s per-read timeout
    assert took < 1.5, took


def test_the_client_still_works_after_a_call_was_cut(auth_service, settings):
    listener = drip_server(head_first=False)
    slow = AuthClient(f"http://127.0.0.1:{listener.getsockname()[1]}/auth/verify", timeout=0.3)
    fine = AuthClient(settings.AUTH_VERIFY_URL, timeout=2.0)
    try:
        with pytest.raises(AuthServiceUnavailable):
            slow.verify("Bearer a")
    finally:
        listener.close()
    for _ in range(3):
        assert fine.verify(f"Bearer {CUSTOMER_TOKEN}").user_id == "alice"


def test_an_oversized_identity_counts_as_unavailable(odd_auth_service):
    class Huge(Quiet):
        def do_GET(self):
            self.answer(200, b'{"user_id": "alice", "pad": "' + b"x" * 200_000 + b'"}')

    with pytest.raises(AuthServiceUnavailable):
        AuthClient(odd_auth_service(Huge), timeout=2.0).verify("Bearer a")


class AnyIdentity(Quiet):
    """Answers 200 with whatever identity the test put in `identity`."""
    identity = b"{}"

    def do_GET(self):
        self.answer(200, type(self).identity, **{"Content-Type": "application/json"})


@pytest.fixture
def any_identity_service(odd_auth_service, settings):
    settings.AUTH_VERIFY_URL = odd_auth_service(AnyIdentity)
    return AnyIdentity


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user_id=st.one_of(st.text(), st.integers(-(10**30), 10**30), st.floats(), st.booleans(), st.none(),
                         st.lists(st.integers(), max_size=2)))
def test_any_user_id_from_the_auth_service_starts_a_saga_or_is_a_503_never_a_500(client, any_identity_service, user_id):
    """Whatever the auth service calls the user: the order is stored under that name whole, or the
    answer is 503 (an auth service outside the contract), never a 500 or a false database outage."""
    any_identity_service.identity = json.dumps({"user_id": user_id}).encode()
    response = client.post("/orders/create_order", data=json.dumps({"items": [{"product_id": "sku-1", "quantity": 1}]}),
                           content_type="application/json", HTTP_AUTHORIZATION="Bearer any")
    assert response.status_code in (202, 503), response.content
    assert response["Content-Type"] == "application/json"
    if response.status_code == 202:
        assert Saga.objects.get(pk=response.json()["saga_id"]).user_id == str(user_id)
    else:
        assert "auth service" in response.json()["detail"]


# API throttles

def test_without_throttle_settings_a_burst_meets_no_limit(api, fresh_redis):
    statuses = {api.create_order(HTTP_IDEMPOTENCY_KEY=f"k{i}").status_code for i in range(40)}
    assert statuses == {202}


def test_the_per_user_throttle_limits_each_caller_on_its_own(api, settings, fresh_redis):
    settings.API_THROTTLE_USER = "3/min"
    assert [api.create_order().status_code for _ in range(3)] == [202, 202, 202]
    limited = api.create_order()
    assert limited.status_code == 429
    assert "detail" in limited.json() and int(limited["Retry-After"]) > 0
    assert api.saga(Saga.objects.first().pk).status_code == 429  # reads count too
    assert api.create_order(token=OTHER_CUSTOMER_TOKEN).status_code == 202
    assert Saga.objects.count() == 4


def test_the_per_address_throttle_stops_bad_tokens_before_the_auth_service(api, settings, fresh_redis):
    settings.API_THROTTLE_ANON = "2/min"
    assert [api.create_order(token="guess-1").status_code, api.create_order(token="guess-2").status_code] == [401, 401]
    assert api.create_order(token="guess-3").status_code == 429
    assert api.create_order().status_code == 429  # same address
    assert api.create_order(REMOTE_ADDR="10.9.8.7").status_code == 202


def test_a_spoofed_forwarded_for_does_not_dodge_the_address_throttle(api, settings, fresh_redis):
    settings.API_THROTTLE_ANON = "1/min"
    assert api.create_order().status_code == 202
    assert api.create_order(HTTP_X_FORWARDED_FOR="203.0.113.9").status_code == 429


def test_the_liveness_check_is_never_throttled(client, settings, fresh_redis):
    settings.API_THROTTLE_ANON = "1/min"
    assert {client.get("/").status_code for _ in range(5)} == {200}


@pytest.mark.parametrize("value", ["fast", "0/s", "10/week", "-1/s", "1.5/s"])
def test_a_bad_throttle_rate_stops_the_process(value):
    result = start(DJANGO_DEBUG="1", API_THROTTLE_USER=value)
    assert result.returncode != 0 and "API_THROTTLE_USER" in result.stderr


# the admin's door

@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("support", password="correct horse battery", is_staff=True)


def log_in(client, password, username="support"):
    return client.post("/admin/login/?next=/admin/", {"username": username, "password": password})


def test_the_staff_login_works_and_sets_an_eight_hour_session(client, staff):
    response = log_in(client, "correct horse battery")
    assert response.status_code == 302 and response["Location"] == "/admin/"
    assert client.cookies["sessionid"]["max-age"] == 8 * 3600


def test_repeated_failures_lock_the_login_even_for_the_right_password(client, staff, settings):
    settings.AXES_FAILURE_LIMIT = 3
    for _ in range(2):
        assert log_in(client, "wrong").status_code == 200  # the form again, with its error
    locked = log_in(client, "wrong")
    assert locked.status_code == 429
    assert log_in(client, "correct horse battery").status_code == 429
    assert "sessionid" not in client.cookies or not client.cookies["sessionid"].value


def test_a_lockout_is_per_username_and_address(client, staff, django_user_model, settings):
    settings.AXES_FAILURE_LIMIT = 2
    django_user_model.objects.create_user("viewer", password="another long phrase", is_staff=True)
    for _ in range(2):
        log_in(client, "wrong")
    assert log_in(client, "correct horse battery").status_code == 429
    assert log_in(client, "another long phrase", username="viewer").status_code == 302


def test_a_success_before_the_limit_clears_the_failures(client, staff, settings):
    settings.AXES_FAILURE_LIMIT = 3
    log_in(client, "wrong")
    log_in(client, "wrong")
    assert log_in(client, "correct horse battery").status_code == 302
    client.logout()
    log_in(client, "wrong")
    log_in(client, "wrong")
    assert log_in(client, "correct horse battery").status_code == 302


@pytest.mark.parametrize("password", ["short", "password123456", "12345678901234", "support-support"])
def test_weak_passwords_are_refused(django_user_model, password):
    user = django_user_model(username="support-support")
    with pytest.raises(ValidationError):
        validate_password(password, user)


def test_a_generated_demo_password_passes_the_validators():
    import secrets

    validate_password(secrets.token_urlsafe(12))  # what create_demo_staff makes


@pytest.mark.parametrize(("env", "named"), [({"SESSION_COOKIE_AGE": "soon"}, "SESSION_COOKIE_AGE"),
                                            ({"AXES_FAILURE_LIMIT": "0"}, "AXES_FAILURE_LIMIT")])
def test_bad_door_settings_stop_the_process(env, named):
    result = start(DJANGO_DEBUG="1", **env)
    assert result.returncode != 0 and named in result.stderr


# the API docs work offline

def test_the_api_docs_page_references_nothing_outside_the_service(client):
    page = client.get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    references = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert len(references) >= 4  # the stylesheet, the favicon, the two scripts
    for reference in references:
        assert reference.startswith("/") and not reference.startswith("//"), reference
        assert client.get(reference).status_code == 200, reference
    assert not re.search(r"https?://", html)
    assert '"validatorUrl": null' in html or '"validatorUrl":null' in html


def test_the_schema_documents_the_json_error_bodies(client):
    schema = json.loads(client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").content)
    create = schema["paths"]["/orders/create_order"]["post"]["responses"]
    assert {"400", "401", "405", "413", "415", "422", "429", "503"} <= set(create)
    assert create["401"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert schema["components"]["schemas"]["Error"]["required"] == ["detail"]
