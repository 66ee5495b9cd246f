"""HTTP API (contract section 2): start an order saga, read a saga's status, liveness.

Whatever a request holds, the answer is JSON: a 4xx naming the problem, never a 500 page.
"""
import codecs
import hashlib
import json
import logging
import re
import uuid

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError
from django.http import JsonResponse
from django.views import defaults
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import exceptions, serializers, status, viewsets
from rest_framework.decorators import action, api_view, authentication_classes, permission_classes, throttle_classes
from rest_framework.parsers import BaseParser
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from sagas import services
from sagas.models import Saga

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY_PATTERN = r"^[\x20-\x7e]{1,255}$"
IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
# JSON is UTF-8 (RFC 8259); the UTF-16/32 of older JSON are read too when the body's charset says so
JSON_CHARSETS = {"utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"}


class ServiceUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The order could not be accepted safely right now; nothing was started. Try again shortly."
    default_code = "unavailable"


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = f"The request body is over {settings.DATA_UPLOAD_MAX_MEMORY_SIZE // 1024} KiB."
    default_code = "too_large"


class StrictString(serializers.CharField):
    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictInteger(serializers.IntegerField):
    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class ClosedSerializer(serializers.Serializer):
    """Refuses fields it does not declare, naming them."""

    def to_internal_value(self, data):
        if not isinstance(data, dict):
            raise serializers.ValidationError({"non_field_errors": ["Expected a JSON object."]})
        unknown = sorted(set(data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return super().to_internal_value(data)


class OrderItemSerializer(ClosedSerializer):
    product_id = StrictString(max_length=64, allow_blank=False, trim_whitespace=False)
    quantity = StrictInteger(min_value=1, max_value=10000)


class CreateOrderSerializer(ClosedSerializer):
    items = OrderItemSerializer(many=True, allow_empty=False, max_length=100)
    currency = serializers.RegexField(r"^[A-Z]{3}$", required=False, default="EUR",
                                      error_messages={"invalid": "Three upper-case letters, e.g. EUR."})
    payment_method = StrictString(max_length=128, required=False, allow_null=True, default=None, trim_whitespace=False)

    def validate_items(self, items):
        seen = [item["product_id"] for item in items]
        if len(seen) != len(set(seen)):
            raise serializers.ValidationError("Each product_id may appear once.")
        return items


class StepSerializer(serializers.Serializer):
    name = serializers.CharField()
    status = serializers.CharField()
    attempts = serializers.IntegerField()
    compensation_attempts = serializers.IntegerField()


class SagaSerializer(serializers.Serializer):
    saga_id = serializers.UUIDField(source="id")
    status = serializers.CharField()
    user_id = serializers.CharField()
    order_id = serializers.CharField(allow_null=True)
    total = serializers.DecimalField(max_digits=14, decimal_places=2, allow_null=True, coerce_to_string=True)
    currency = serializers.CharField()
    failure_reason = serializers.CharField(allow_null=True)
    current_step = serializers.CharField(allow_null=True)
    steps = StepSerializer(many=True, source="state.steps")
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


ACCEPTED = inline_serializer("SagaAccepted", {"saga_id": serializers.UUIDField(), "status": serializers.CharField(),
                                              "status_url": serializers.CharField()})


def _fingerprint(order: dict) -> str:
    return hashlib.sha256(json.dumps(order, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class UnsupportedCharset(exceptions.APIException):
    status_code = status.HTTP_415_UNSUPPORTED_MEDIA_TYPE
    default_detail = "JSON bodies are UTF-8 (or UTF-16/32 when the Content-Type's charset says so)."
    default_code = "unsupported_charset"


class StrictJSONParser(BaseParser):
    """Reads every body as JSON, whatever its Content-Type, so a body that is not a JSON object is a 400.

    Strict where DRF's parser is lenient or crashes: undecodable bytes, NaN/Infinity, numbers past
    Python's int-from-string limit and nesting past the recursion limit are all a 400.
    """

    media_type = "*/*"

    def parse(self, stream, media_type=None, parser_context=None):
        raw = stream.read()
        charset = parser_context["request"]._request.content_params.get("charset")
        try:
            encoding = codecs.lookup(charset).name if charset else json.detect_encoding(raw)
        except (LookupError, ValueError):  # ValueError: a NUL in the name
            raise UnsupportedCharset() from None
        if encoding not in JSON_CHARSETS:
            raise UnsupportedCharset()
        try:
            return json.loads(raw.decode(encoding), parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise exceptions.ParseError(f"The body is not valid JSON: {str(error)[:200]}") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


ERROR = inline_serializer("Error", {"detail": serializers.CharField()})
FIELD_ERRORS = OpenApiResponse(OpenApiTypes.OBJECT, description="Each offending field (or header) with its errors.")
ERROR_RESPONSES = {
    400: FIELD_ERRORS,
    401: OpenApiResponse(ERROR, description="No bearer token, or the auth service rejected it."),
    404: OpenApiResponse(ERROR, description="No such saga, or not the caller's."),
    405: OpenApiResponse(ERROR, description="The route does not serve this method."),
    413: OpenApiResponse(ERROR, description="The body is over 64 KiB."),
    415: OpenApiResponse(ERROR, description="A Content-Type that cannot be read, or a charset JSON is not written in."),
    422: OpenApiResponse(FIELD_ERRORS.response, description="The Idempotency-Key was used with another body."),
    429: OpenApiResponse(ERROR, description="Over the API_THROTTLE_USER or API_THROTTLE_ANON rate."),
    503: OpenApiResponse(ERROR, description="The auth service or the database is unavailable; nothing was started."),
}


def errors(*codes: int) -> dict:
    return {code: ERROR_RESPONSES[code] for code in codes}


class OrderViewSet(viewsets.ViewSet):
    parser_classes = [StrictJSONParser]

    @extend_schema(
        request=CreateOrderSerializer,
        parameters=[OpenApiParameter("Idempotency-Key", {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
                                     OpenApiParameter.HEADER, description="1..255 printable ASCII characters")],
        responses={202: ACCEPTED, 200: ACCEPTED, **errors(400, 401, 405, 413, 415, 422, 429, 503)},
    )
    @action(detail=False, methods=["post"], url_path="create_order")
    def create_order(self, request):
        """Start an order saga: reduce stock, take payment, create the order; undone in reverse on failure."""
        try:
            request._request.body  # noqa: B018  Django raises RequestDataTooBig past DATA_UPLOAD_MAX_MEMORY_SIZE
        except RequestDataTooBig:
            raise PayloadTooLarge() from None
        key = request.headers.get("Idempotency-Key")
        if key is not None and not IDEMPOTENCY_KEY.match(key):
            raise exceptions.ValidationError({"Idempotency-Key": ["1 to 255 printable ASCII characters."]})
        order = CreateOrderSerializer(data=request.data)
        order.is_valid(raise_exception=True)
        order = {**order.validated_data, "items": [dict(item) for item in order.validated_data["items"]]}
        try:
            saga, created = services.start_order_saga(user_id=request.user.user_id, idempotency_key=key,
                                                      fingerprint=_fingerprint(order) if key else "", **order)
        except services.IdempotencyConflict:
            return Response({"Idempotency-Key": ["This key was used with a different request body."]},
                            status=status.HTTP_422_UNPROCESSABLE_ENTITY)
        except DatabaseError as error:
            log.warning("order not started, database unavailable: %r", error)
            raise ServiceUnavailable() from error
        status_url = f"/sagas/{saga.id}"
        return Response(
            {"saga_id": str(saga.id), "status": saga.status, "status_url": status_url},
            status=status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK,
            headers={"Location": status_url},
        )


class SagaViewSet(viewsets.ViewSet):
    lookup_value_regex = "[^/]+"

    @extend_schema(responses={200: SagaSerializer, **errors(401, 404, 405, 429, 503)})
    def retrieve(self, request, pk=None):
        """A saga's status, to its owner or to staff; 404 to anyone else."""
        try:
            saga = Saga.objects.filter(pk=uuid.UUID(pk)).first()
        except ValueError:
            saga = None
        except DatabaseError as error:
            raise ServiceUnavailable() from error
        caller = request.user
        if saga is None or not (caller.is_staff or saga.user_id == caller.user_id):
            raise exceptions.NotFound("No such saga.")
        return Response(SagaSerializer(saga).data)


@extend_schema(responses={200: inline_serializer("Liveness", {"status": serializers.CharField()}), **errors(405)})
@api_view(["GET"])
@authentication_classes([])
@permission_classes([])
@throttle_classes([])  # load balancers poll it
def liveness(request):
    return Response({"status": "ok", "service": "order-orchestrator"})


def exception_handler(error, context):
    response = drf_exception_handler(error, context)
    if response is not None and isinstance(error, exceptions.ValidationError) and isinstance(response.data, list):
        response.data = {"non_field_errors": response.data}
    return response


# Django's own error pages, for the requests that never reach a DRF view (an unknown path, a
# crash in a middleware): JSON, except on the admin, whose pages are for people.

def _is_admin(request) -> bool:
    return request.path.startswith("/admin/")


def bad_request(request, exception):
    if _is_admin(request):
        return defaults.bad_request(request, exception)
    return JsonResponse({"detail": "Bad request."}, status=400)


def permission_denied(request, exception):
    if _is_admin(request):
        return defaults.permission_denied(request, exception)
    return JsonResponse({"detail": "Forbidden."}, status=403)


def not_found(request, exception):
    if _is_admin(request):
        return defaults.page_not_found(request, exception)
    return JsonResponse({"detail": "Not found."}, status=404)


def server_error(request):
    if _is_admin(request):
        return defaults.server_error(request)
    return JsonResponse({"detail": "Internal error; nothing more is known here. It was logged."}, status=500)
