"""No request gets a 500: schemathesis fuzzes the API from its own OpenAPI schema, in process
against the WSGI app, and targeted tests (hypothesis where bodies are generated) send what a
schema fuzzer never makes: deep nesting, odd encodings, huge numbers, foreign content types,
other methods, unknown paths, bad headers. Every answer is a 4xx with a JSON object.
"""
import json
import uuid

import pytest
import schemathesis
from django.core.wsgi import get_wsgi_application
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from sagas.models import Saga
from tests.conftest import CUSTOMER_TOKEN, ORDER

pytestmark = pytest.mark.django_db

EXAMPLES_PER_OPERATION_AND_MODE = 80  # at most 80 x 3 operations x 2 modes: a CI-sized run
AUTH = {"HTTP_AUTHORIZATION": f"Bearer {CUSTOMER_TOKEN}"}
ROUTES = ["/", "/orders/create_order", f"/sagas/{uuid.uuid4()}", "/api/schema/", "/api/docs/"]
FUZZ = settings(max_examples=EXAMPLES_PER_OPERATION_AND_MODE, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def test_schemathesis_finds_no_server_error_and_every_answer_matches_the_schema(transactional_db, auth_service, fresh_redis):
    # transactional_db: unlike Django's test client, schemathesis' WSGI client lets Django close the
    # connection after each request, which would end the test's enclosing transaction
    schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application())
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance]
    sent: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case):
                case.call_and_validate(headers={"Authorization": f"Bearer {CUSTOMER_TOKEN}"}, checks=checks)
                label = f"{operation.label} {mode.value}"  # noqa: B023 (call() runs within this turn of the loop)
                sent[label] = sent.get(label, 0) + 1

            try:
                call()
            except Unsatisfiable:
                # nothing to get wrong: GET / takes no input at all
                assert mode == schemathesis.GenerationMode.NEGATIVE and not operation.body and not operation.path_parameters
                sent[f"{operation.label} {mode.value}"] = 0
    print(f"schemathesis cases: {sum(sent.values())} {sent}")
    assert len(sent) == 6 and sum(sent.values()) >= 200


def assert_json_error(response, status: int) -> dict:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict) and body
    return body


def post_raw(client, body: bytes, content_type: str = "application/json", **headers):
    """The bytes as they are (client.post would re-encode them to the content type's charset)."""
    return client.generic("POST", "/orders/create_order", data=body, content_type=content_type, **AUTH, **headers)


@pytest.mark.parametrize("depth", [1_000, 30_000])
def test_deep_nesting_is_a_400(client, auth_service, depth):
    assert_json_error(post_raw(client, b"[" * depth + b"]" * depth), 400)
    assert_json_error(post_raw(client, b'{"items": ' + b"[" * depth), 400)


def test_deeper_nesting_than_the_size_limit_allows_is_a_413(client, auth_service):
    assert_json_error(post_raw(client, b"[" * 100_000), 413)


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        ("utf-16-bom", "application/json", 202),  # json.detect_encoding reads it, as RFC 8259 allows
        ("utf-16", "application/json; charset=utf-16", 202),
        ("utf-8-bom", "application/json", 202),
        ("latin-1", "application/json; charset=latin-1", 415),
        ("utf-8", "application/json; charset=no-such-codec", 415),
        ("utf-8", "application/json; charset=zlib", 415),
        ("invalid-utf-8", "application/json", 400),
        ("invalid-utf-8", "application/json; charset=utf-8", 400),
    ],
)
def test_encodings(client, auth_service, body, content_type, status):
    text = json.dumps({**ORDER, "payment_method": "pm-é"}, ensure_ascii=False)
    raw = {"utf-16-bom": text.encode("utf-16"), "utf-16": text.encode("utf-16"),
           "utf-8-bom": b"\xef\xbb\xbf" + text.encode(), "latin-1": text.encode("latin-1"), "utf-8": text.encode(),
           "invalid-utf-8": text.encode().replace(b"\xc3\xa9", b"\xc3\x28")}[body]
    response = post_raw(client, raw, content_type)
    if status == 202:
        assert response.status_code == 202, response.content
        assert Saga.objects.get(pk=response.json()["saga_id"]).payment_method == "pm-é"
    else:
        assert_json_error(response, status)
        assert not Saga.objects.exists()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"items": [{"product_id": "a\\u0000b", "quantity": 1}]}',
        b'{"items": [{"product_id": "\\ud800", "quantity": 1}]}',
        b'{"items": [{"product_id": "a", "quantity": 1}], "payment_method": "\\udfff"}',
        b'{"items": [{"product_id": "a", "quantity": 1}], "payment_method": "pm\\u0000"}',
        b'{"items": [{"product_id": "a", "quantity": 1}], "\\ud800": 1}',
        b'{"items": [{"product_id": "a", "quantity": 1}], "currency": "E\\u0000R"}',
        b'{"items": [{"product_id": "a", "quantity": 1}]}\x00',
        b'{"items": [{"product_id": "a", "quantity": 1e999}]}',
        b'{"items": [{"product_id": "a", "quantity": ' + b"9" * 5000 + b"}]}",
        b'{"items": [{"product_id": "a", "quantity": NaN}]}',
        b'{"items": [{"product_id": "a", "quantity": Infinity}]}',
        b'{"items": [{"product_id": "a", "quantity": -Infinity}]}',
        b'{"items": [{"product_id": "a", "quantity": 1.0}]}',
    ],
)
def test_strings_postgresql_cannot_store_and_numbers_python_cannot_read_are_a_400(client, auth_service, raw):
    assert_json_error(post_raw(client, raw), 400)
    assert not Saga.objects.exists()


def test_an_error_naming_a_lone_surrogate_is_still_valid_json(client, auth_service):
    body = assert_json_error(post_raw(client, b'{"items": [{"product_id": "a", "quantity": 1}], "\\ud800": 1}'), 400)
    assert "\ud800" in body


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz", "text/plain", "", "\x00/\x00"],
)
def test_foreign_content_types_are_read_as_json(client, auth_service, content_type):
    assert post_raw(client, json.dumps(ORDER).encode(), content_type).status_code == 202
    assert_json_error(post_raw(client, b"items=1&currency=EUR", content_type), 400)


def test_a_content_type_too_long_to_read_gets_415(client, auth_service):
    assert_json_error(post_raw(client, json.dumps(ORDER).encode(), "a" * 20_000), 415)
    assert not Saga.objects.exists()


def test_no_body_at_all_is_a_400(client, auth_service):
    assert_json_error(client.post("/orders/create_order", **AUTH), 400)


@given(body=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                         lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=40))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_json_document_is_a_202_or_a_400(client, auth_service, body):
    response = post_raw(client, json.dumps(body).encode())
    assert response.status_code in (202, 400), response.content[:300]
    assert isinstance(response.json(), dict)


ANY_CHARACTER = st.characters(codec=None, exclude_categories=())  # NUL, lone surrogates, unassigned: all of them
ANY_STRING = st.text(ANY_CHARACTER, max_size=70) | st.sampled_from(["\x00", "\ud800", "a\udfffb", "sku-1"])


@given(product_id=ANY_STRING, payment_method=ANY_STRING, key=st.text(ANY_CHARACTER, max_size=20))
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_string_is_stored_whole_or_refused_never_a_500(client, auth_service, product_id, payment_method, key):
    order = {"items": [{"product_id": product_id, "quantity": 1}], "payment_method": payment_method}
    body = {**order, key: 1} if key else order
    response = post_raw(client, json.dumps(body).encode())  # ensure_ascii: surrogates travel as \uXXXX escapes
    assert response.status_code in (202, 400), response.content[:300]
    if response.status_code == 202:
        saga = Saga.objects.get(pk=response.json()["saga_id"])
        assert (saga.items[0]["product_id"], saga.payment_method) == (product_id, payment_method)
        assert not any(c == "\x00" or "\ud800" <= c <= "\udfff" for c in product_id + payment_method)


@given(raw=st.binary(max_size=300))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_bytes_are_a_4xx_with_a_json_error(client, auth_service, raw):
    response = post_raw(client, raw)
    assert 400 <= response.status_code < 500 or response.status_code == 202, response.content[:300]
    assert isinstance(response.json(), dict)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("method", ["put", "patch", "delete", "options", "trace"])
def test_methods_a_route_does_not_serve_get_405_json(client, auth_service, route, method):
    response = getattr(client, method)(route, **AUTH)
    assert_json_error(response, 405)


def test_a_method_nobody_knows_gets_405_json(client, auth_service):
    response = client.generic("BREW", "/orders/create_order", **AUTH)
    assert_json_error(response, 405)


@pytest.mark.parametrize("path", ["/nope", "/orders/", "/orders/create_order/", "/sagas/", "/api/", "/static/nope.js",
                                  "/sagas/a/b", "/%00", "/" + "x" * 5000])
def test_unknown_paths_get_404_json(client, path):
    assert_json_error(client.get(path), 404)


def test_the_admin_keeps_its_html_404(admin_client):
    assert admin_client.get("/admin/nope/").status_code == 404


@pytest.mark.parametrize("saga_id", ["x", "0", "%00", "\u00e9", "1" * 5000, str(uuid.uuid4()).upper(), "' OR 1=1 --"])
def test_bad_saga_ids_get_404_json(client, auth_service, saga_id):
    assert_json_error(client.get(f"/sagas/{saga_id}", **AUTH), 404)


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\tkey", "nul\x00", "\u00e9", "\r\nX-Evil: 1"])
def test_bad_idempotency_keys_get_400_json(client, auth_service, key):
    body = assert_json_error(post_raw(client, json.dumps(ORDER).encode(), HTTP_IDEMPOTENCY_KEY=key), 400)
    assert "Idempotency-Key" in body


@pytest.mark.parametrize(
    "authorization",
    ["Bearer " + "t" * 100_000, "Bearer \u00e9t\u00e9", "Bearer a\x00b", "Bearer a b", "Basic dXNlcjpwdw==", "Bearer",
     "x" * 100_000],
)
def test_odd_and_huge_authorization_headers_get_401_json(client, auth_service, authorization):
    response = client.post("/orders/create_order", data=ORDER, content_type="application/json",
                           HTTP_AUTHORIZATION=authorization)
    assert_json_error(response, 401)


def test_huge_other_headers_change_nothing(client, auth_service):
    response = post_raw(client, json.dumps(ORDER).encode(), HTTP_X_PADDING="p" * 200_000, HTTP_ACCEPT="x" * 10_000)
    assert response.status_code == 202


def test_an_accept_header_naming_nothing_json_still_gets_json(client, auth_service):
    assert_json_error(client.get(f"/sagas/{uuid.uuid4()}", HTTP_ACCEPT="text/html", **AUTH), 404)


def test_a_host_the_service_does_not_answer_to_gets_400_json(client):
    assert_json_error(client.get("/", HTTP_HOST="evil.example"), 400)


def test_a_crash_outside_any_view_answers_json_except_on_the_admin(rf):
    from sagas.api import server_error

    response = server_error(rf.get("/orders/create_order"))
    assert response.status_code == 500 and json.loads(response.content)["detail"]
    admin_page = server_error(rf.get("/admin/sagas/saga/"))
    assert admin_page.status_code == 500 and admin_page["Content-Type"].startswith("text/html")
