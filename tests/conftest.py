"""Named fixtures for the people, services and sagas the tests use. Everything is real:
PostgreSQL, Redis and RabbitMQ on this machine, the demo auth service and participants."""
import json
import threading
import time
import uuid

import pytest
from django.conf import settings
from django.db import connection
from django_redis import get_redis_connection

from demo.auth_server import serve_auth
from demo.catalogue import CUSTOMER_TOKEN, OTHER_CUSTOMER_TOKEN, STAFF_TOKEN  # noqa: F401 - the tests import them from here
from demo.participants import start_participants
from lab.faults import infra
from sagas import runtime
from sagas.broker import DEAD_LETTER_QUEUE, PARTICIPANT_QUEUES, REPLIES_QUEUE, Broker
from sagas.consumer import SagaConsumer
from sagas.engine import TERMINAL
from sagas.models import Saga
from sagas.runtime import Runtime
from tests.tcp_proxy import StallingProxy

ORDER = {"items": [{"product_id": "sku-1", "quantity": 2}], "currency": "EUR", "payment_method": "pm-123"}


def wait_for(predicate, *, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def database_url() -> str:
    """The test database, as a DATABASE_URL for a process started by the test."""
    db = connection.settings_dict
    return f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


@pytest.fixture
def auth_service(settings):
    server = serve_auth(0)
    settings.AUTH_VERIFY_URL = f"http://127.0.0.1:{server.server_port}{settings.AUTH_VERIFY_PATH}"
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def api(client, auth_service):
    """POST and GET as a caller with a bearer token."""

    class Api:
        def create_order(self, body=ORDER, *, token=CUSTOMER_TOKEN, **headers):
            raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
            return client.post("/orders/create_order", data=raw, content_type="application/json",
                               HTTP_AUTHORIZATION=f"Bearer {token}", **headers)

        def saga(self, saga_id, *, token=CUSTOMER_TOKEN):
            return client.get(f"/sagas/{saga_id}", HTTP_AUTHORIZATION=f"Bearer {token}")

    return Api()


@pytest.fixture
def fresh_redis():
    get_redis_connection("default").flushdb()


@pytest.fixture
def fresh_queues():
    broker = Broker()
    broker.purge(REPLIES_QUEUE, DEAD_LETTER_QUEUE, *PARTICIPANT_QUEUES)
    broker.close()


@pytest.fixture
def fast_deadlines(settings):
    settings.SAGA_STEP_TIMEOUT_SECONDS = 0.5
    settings.SAGA_STEP_MAX_ATTEMPTS = 3
    settings.SAGA_COMPENSATION_MAX_ATTEMPTS = 4


def in_thread(target, name):
    def run():
        from django.db import connections

        try:
            target()
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def participants(tmp_path, fresh_queues):
    stop = threading.Event()
    ledger = tmp_path / "ledger.sqlite3"
    threads = start_participants(ledger_path=ledger, should_stop=stop.is_set)
    yield ledger
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    assert not [t.name for t in threads if t.is_alive()], "participants did not stop within 10 s"


def start_consumer(name: str = "saga-consumer", **options):
    """A consumer with a runtime of its own (as run_saga_consumer builds it), running in a thread;
    returns it and a function that stops it."""
    saga_consumer = SagaConsumer(Runtime.for_consumer(Broker()), **options)
    thread = in_thread(saga_consumer.run, name)

    def stop():
        saga_consumer.stop()
        thread.join(timeout=10)
        assert not thread.is_alive(), f"{name} did not stop within 10 s"

    return saga_consumer, stop


@pytest.fixture
def consumer(fast_deadlines, fresh_redis, fresh_queues):
    saga_consumer, stop = start_consumer(deadline_check_seconds=0.1)
    yield saga_consumer
    stop()


@pytest.fixture
def saga_stack(transactional_db, api, participants, consumer):
    """The whole service: API, consumer, participants and auth, over the real broker, Redis and database."""
    return api


def finished(saga_id, timeout=20.0) -> Saga:
    return wait_for(
        lambda: Saga.objects.filter(pk=saga_id, status__in=TERMINAL).first(),
        timeout=timeout, what=f"saga {saga_id} to finish",
    )


@pytest.fixture
def slow_auth_service(settings):
    """An auth service that answers after the orchestrator stopped waiting."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(1.0)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"user_id": "alice"}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.AUTH_TIMEOUT_SECONDS = 0.3
    yield f"http://127.0.0.1:{server.server_port}/auth/verify"
    server.shutdown()
    server.server_close()


@pytest.fixture
def private_queue():
    """A durable queue of the test's own in the tests' vhost, deleted afterwards."""
    vhost, queue = settings.RABBITMQ["vhost"], f"tests.{uuid.uuid4().hex}"
    infra.declare_queue(vhost, queue)
    yield queue
    infra.delete_queue(vhost, queue)


@pytest.fixture
def web_runtime():
    """The web process's runtime, a fresh one of the test's own (its publisher connects with the
    settings of the moment), installed for the test and stopped afterwards."""
    web = Runtime.for_web()
    previous = runtime.install(web)
    yield web
    runtime.install(previous)
    web.stop()


@pytest.fixture
def outbox_publisher(web_runtime):
    """The web requests' background publisher, of the test's own runtime."""
    return web_runtime.publisher


@pytest.fixture
def stalling_proxy(settings):
    """The service reaches RabbitMQ through a proxy of the test's own that can stall."""
    proxy = StallingProxy(target=("127.0.0.1", settings.RABBITMQ["port"]))
    settings.RABBITMQ = {**settings.RABBITMQ, "host": "127.0.0.1", "port": proxy.port}
    yield proxy
    proxy.close()


@pytest.fixture
def make_staff(django_user_model):
    """A staff member (or, with is_staff=False, a plain user) holding exactly the named saga-app permissions."""
    def make(username, *codenames, is_staff=True):
        from django.contrib.auth.models import Permission

        user = django_user_model.objects.create_user(username, password="pw", is_staff=is_staff)
        user.user_permissions.set(Permission.objects.filter(content_type__app_label="sagas", codename__in=codenames))
        return user
    return make
