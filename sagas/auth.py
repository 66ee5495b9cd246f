"""Who is calling: the caller's bearer token, checked with the auth service (contract section 3).

Fails closed: a rejected token is 401, an auth service that is down, slow or erroring is 503.
"""
import logging
from dataclasses import dataclass

import requests
from django.conf import settings
from django.dispatch import receiver
from django.test.signals import setting_changed
from rest_framework import authentication, exceptions, status

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 1.0


@dataclass(frozen=True)
class Caller:
    user_id: str
    is_staff: bool = False
    is_authenticated: bool = True


class AuthServiceUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The auth service is unavailable; nothing was started. Try again shortly."
    default_code = "auth_unavailable"


class AuthClient:
    def __init__(self, verify_url: str, *, read_timeout: float):
        self.verify_url = verify_url
        self.timeout = (CONNECT_TIMEOUT, read_timeout)
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy or .netrc lookups: the auth service is called directly
        self.session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=settings.WEB_THREADS))
        self.session.mount("https://", requests.adapters.HTTPAdapter(pool_maxsize=settings.WEB_THREADS))

    def verify(self, authorization: str) -> Caller | None:
        """The caller, None for a rejected token; raises AuthServiceUnavailable otherwise."""
        try:
            response = self.session.get(self.verify_url, headers={"Authorization": authorization}, timeout=self.timeout)
        except requests.RequestException as error:
            log.warning("auth service unreachable: %r", error)
            raise AuthServiceUnavailable() from error
        if response.status_code in (401, 403):
            return None
        if response.status_code != 200:
            log.warning("auth service answered %s", response.status_code)
            raise AuthServiceUnavailable()
        try:
            identity = response.json()
            user_id = identity["user_id"]
        except (ValueError, KeyError, TypeError):
            log.warning("auth service answered 200 without a user_id")
            raise AuthServiceUnavailable() from None
        if isinstance(user_id, bool) or not isinstance(user_id, (str, int)) or str(user_id) == "":
            raise AuthServiceUnavailable()
        return Caller(user_id=str(user_id), is_staff=identity.get("is_staff") is True)


_client: AuthClient | None = None


def auth_client() -> AuthClient:
    global _client
    if _client is None:
        _client = AuthClient(settings.AUTH_VERIFY_URL, read_timeout=settings.AUTH_TIMEOUT_SECONDS)
    return _client


@receiver(setting_changed)
def _forget_client(*, setting: str, **kwargs) -> None:
    """Settings changed at run time (tests do): the next call makes a client from the new ones."""
    global _client
    if setting in ("AUTH_VERIFY_URL", "AUTH_TIMEOUT_SECONDS", "WEB_THREADS"):
        _client = None


class BearerTokenAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise exceptions.NotAuthenticated("Send 'Authorization: Bearer <token>'.")
        caller = auth_client().verify(header)
        if caller is None:
            raise exceptions.AuthenticationFailed("The token was rejected by the auth service.")
        return caller, token

    def authenticate_header(self, request):
        return "Bearer"
