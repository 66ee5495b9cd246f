"""The HTTP API, every status the contract names. The auth service is the real demo one."""
import uuid

import pytest

from sagas.models import OutboxMessage, Saga
from tests.conftest import ORDER, OTHER_CUSTOMER_TOKEN, STAFF_TOKEN

pytestmark = pytest.mark.django_db


def test_liveness(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_accepted_order_is_saved_with_its_first_command_in_the_outbox(api, fresh_redis):
    response = api.create_order()
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "running"
    assert response["Location"] == body["status_url"] == f"/sagas/{body['saga_id']}"
    saga = Saga.objects.get(pk=body["saga_id"])
    assert saga.user_id == "alice" and saga.current_step == "reduce_stock"
    (command,) = OutboxMessage.objects.filter(saga=saga)
    assert command.routing_key == "stock.reduce"
    assert command.body == {"saga_id": body["saga_id"], "command": "stock.reduce", "attempt": 1,
                            "payload": {"items": ORDER["items"]}}


def test_currency_defaults_to_eur(api):
    response = api.create_order({"items": [{"product_id": "sku-1", "quantity": 1}]})
    assert response.status_code == 202
    assert Saga.objects.get(pk=response.json()["saga_id"]).currency == "EUR"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"items": []}, "items"),
        ({"items": [{"product_id": "a", "quantity": 1}] * 2}, "items"),
        ({"items": [{"product_id": "", "quantity": 1}]}, "items"),
        ({"items": [{"product_id": "x" * 65, "quantity": 1}]}, "items"),
        ({"items": [{"product_id": 7, "quantity": 1}]}, "items"),
        ({"items": [{"product_id": "a", "quantity": 0}]}, "items"),
        ({"items": [{"product_id": "a", "quantity": 10001}]}, "items"),
        ({"items": [{"product_id": "a", "quantity": "2"}]}, "items"),
        ({"items": [{"product_id": "a", "quantity": True}]}, "items"),
        ({"items": [{"product_id": "a", "quantity": 1, "price": 1}]}, "items"),
        ({"items": [{"product_id": f"p{i}", "quantity": 1} for i in range(101)]}, "items"),
        ({"items": [{"product_id": "a", "quantity": 1}], "currency": "eur"}, "currency"),
        ({"items": [{"product_id": "a", "quantity": 1}], "currency": 978}, "currency"),
        ({"items": [{"product_id": "a", "quantity": 1}], "payment_method": "p" * 129}, "payment_method"),
        ({"items": [{"product_id": "a", "quantity": 1}], "total": "0.01"}, "total"),
        ({}, "items"),
    ],
)
def test_invalid_orders_get_400_naming_the_field(api, body, field):
    response = api.create_order(body)
    assert response.status_code == 400
    assert field in response.json()
    assert not Saga.objects.exists()


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '"a string"', "{"])
def test_a_body_that_is_not_a_json_object_gets_400(api, raw):
    response = api.create_order(raw)
    assert response.status_code == 400
    assert not Saga.objects.exists()


def test_a_body_over_64_kib_gets_413(api):
    response = api.create_order({"items": [{"product_id": "a", "quantity": 1}], "payment_method": "x" * 70_000})
    assert response.status_code == 413
    assert not Saga.objects.exists()


def test_missing_or_rejected_token_gets_401_and_starts_nothing(api, client):
    assert client.post("/orders/create_order", data=ORDER, content_type="application/json").status_code == 401
    response = api.create_order(token="stolen")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"
    assert not Saga.objects.exists()


def test_auth_checked_before_the_body(api):
    assert api.create_order("not json", token="stolen").status_code == 401


def test_auth_service_down_gets_503_and_starts_nothing(api, auth_service):
    auth_service.shutdown()
    auth_service.server_close()
    assert api.create_order().status_code == 503
    assert not Saga.objects.exists()


def test_auth_service_too_slow_gets_503(api, settings, slow_auth_service):
    settings.AUTH_VERIFY_URL = slow_auth_service
    assert api.create_order().status_code == 503
    assert not Saga.objects.exists()


def test_same_idempotency_key_and_body_returns_the_same_saga(api):
    first = api.create_order(HTTP_IDEMPOTENCY_KEY="order-42")
    again = api.create_order(HTTP_IDEMPOTENCY_KEY="order-42")
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["saga_id"] == first.json()["saga_id"]
    assert Saga.objects.count() == 1


def test_same_idempotency_key_with_another_body_gets_422(api):
    assert api.create_order(HTTP_IDEMPOTENCY_KEY="order-43").status_code == 202
    other = {**ORDER, "items": [{"product_id": "sku-2", "quantity": 1}]}
    assert api.create_order(other, HTTP_IDEMPOTENCY_KEY="order-43").status_code == 422
    assert Saga.objects.count() == 1


def test_idempotency_keys_belong_to_their_user(api):
    mine = api.create_order(HTTP_IDEMPOTENCY_KEY="k")
    theirs = api.create_order(token=OTHER_CUSTOMER_TOKEN, HTTP_IDEMPOTENCY_KEY="k")
    assert theirs.status_code == 202 and theirs.json()["saga_id"] != mine.json()["saga_id"]


def test_an_invalid_idempotency_key_gets_400(api):
    assert api.create_order(HTTP_IDEMPOTENCY_KEY="x" * 256).status_code == 400
    assert api.create_order(HTTP_IDEMPOTENCY_KEY="tab\tkey").status_code == 400


def test_owner_and_staff_see_a_saga_others_get_404(api):
    saga_id = api.create_order().json()["saga_id"]
    mine = api.saga(saga_id)
    assert mine.status_code == 200
    body = mine.json()
    assert body["saga_id"] == saga_id and body["status"] == "running" and body["user_id"] == "alice"
    assert body["total"] is None and body["order_id"] is None and body["currency"] == "EUR"
    assert [step["name"] for step in body["steps"]] == ["reduce_stock", "take_payment", "create_order"]
    assert body["steps"][0] == {"name": "reduce_stock", "status": "running", "attempts": 1, "compensation_attempts": 0}
    assert api.saga(saga_id, token=STAFF_TOKEN).status_code == 200
    assert api.saga(saga_id, token=OTHER_CUSTOMER_TOKEN).status_code == 404


def test_unknown_or_malformed_saga_ids_get_404(api):
    assert api.saga(uuid.uuid4()).status_code == 404
    assert api.saga("not-a-uuid").status_code == 404


def test_status_needs_a_token(client, auth_service):
    assert client.get(f"/sagas/{uuid.uuid4()}").status_code == 401


def test_openapi_schema_and_docs_are_served(client):
    schema = client.get("/api/schema/")
    assert schema.status_code == 200
    assert b"/orders/create_order" in schema.content
    assert client.get("/api/docs/").status_code == 200
