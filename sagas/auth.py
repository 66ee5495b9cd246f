"""Who is calling: the caller's bearer token, checked with the auth service (contract section 3).

Fails closed: a rejected token is 401, an auth service that is down, slow or erroring is 503.
The check ends within AUTH_TIMEOUT_SECONDS in total, however slowly the auth service drips its
answer, follows no redirect and keeps no cookie: each call stands on the caller's token alone.
"""
import contextvars
import heapq
import itertools
import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import requests
from django.conf import settings
from django.dispatch import receiver
from django.test.signals import setting_changed
from rest_framework import authentication, exceptions, status, throttling
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from sagas.replies import storable_text

log = logging.getLogger(__name__)

MAX_USER_ID_LENGTH = 128  # the saga's user_id column

CONNECT_TIMEOUT = 1.0
MAX_IDENTITY_BYTES = 64 * 1024
# RFC 6750's token characters and then some (any visible ASCII); longer tokens are not tokens
BEARER_TOKEN = re.compile(r"^[\x21-\x7e]{1,4096}$")


@dataclass(frozen=True)
class Caller:
    user_id: str
    is_staff: bool = False
    is_authenticated: bool = True


class AuthServiceUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The auth service is unavailable; nothing was started. Try again shortly."
    default_code = "auth_unavailable"


# requests' timeouts bound each read, not the call: a server sending a byte a second never trips
# them. So every call registers the connections it uses, and one watchdog thread shuts their
# sockets at the call's deadline, which wakes the blocked read with an error.

@dataclass(eq=False)
class _Call:
    deadline: float
    connections: list = field(default_factory=list)
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def cut(self) -> None:
        with self.lock:
            if self.finished:
                return
            self.finished = True
            for connection in self.connections:
                if connection.sock is not None:
                    try:
                        connection.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def finish(self) -> bool:
        """True if the call ended before its deadline cut it."""
        with self.lock:
            in_time, self.finished = not self.finished, True
            return in_time


_current_call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("auth_call", default=None)


class _Watchdog:
    def __init__(self):
        self._due: list = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, call: _Call) -> None:
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="auth-deadlines", daemon=True)
                self._thread.start()
            heapq.heappush(self._due, (call.deadline, next(self._order), call))
            if self._due[0][2] is call:  # only an earlier deadline than the one it sleeps towards wakes it
                self._wake.notify()

    def _run(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    heapq.heappop(self._due)[2].cut()
                self._wake.wait(self._due[0][0] - now if self._due else None)


_watchdog = _Watchdog()


class _WatchedConnection:
    def request(self, *args, **kwargs):
        call = _current_call.get()
        if call is not None:
            call.connections.append(self)
        return super().request(*args, **kwargs)


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = type("WatchedHTTPConnection", (_WatchedConnection, HTTPConnection), {})


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = type("WatchedHTTPSConnection", (_WatchedConnection, HTTPSConnection), {})


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


class AuthClient:
    def __init__(self, verify_url: str, *, timeout: float):
        self.verify_url = verify_url
        self.total_timeout = timeout
        self.timeout = (min(CONNECT_TIMEOUT, timeout), timeout)
        # requests' transport adapter alone, without a Session: no proxy or .netrc lookup, no
        # cookie jar, no redirect handling, and half the CPU of a Session's call
        self.adapter = _WatchedAdapter(pool_maxsize=settings.WEB_THREADS)
        self._request = requests.Request("GET", verify_url).prepare()

    def verify(self, authorization: str) -> Caller | None:
        """The caller, None for a rejected token; raises AuthServiceUnavailable otherwise."""
        call = _Call(deadline=time.monotonic() + self.total_timeout)
        token = _current_call.set(call)
        _watchdog.watch(call)
        try:
            status_code, body = self._ask(authorization, call)
        except (requests.RequestException, OSError, ValueError) as error:  # ValueError: http.client's header checks
            log.warning("auth service unreachable or too slow: %r", error)
            raise AuthServiceUnavailable() from error
        finally:
            _current_call.reset(token)
            call.finish()
        if status_code in (401, 403):
            return None
        if status_code != 200:  # a redirect too: the contract names no other place to ask
            log.warning("auth service answered %s", status_code)
            raise AuthServiceUnavailable()
        return _caller_from(body)

    def _ask(self, authorization: str, call: _Call) -> tuple[int, bytes]:
        request = self._request.copy()
        request.headers["Authorization"] = authorization
        with self.adapter.send(request, stream=True, timeout=self.timeout) as response:
            body = b""
            for chunk in response.iter_content(16 * 1024):
                body += chunk
                if len(body) > MAX_IDENTITY_BYTES:
                    raise ValueError(f"auth service answer over {MAX_IDENTITY_BYTES} bytes")
            # settled before the connection goes back to the pool, where a late cut would hit another call
            if not call.finish():
                raise TimeoutError(f"no whole answer within {self.total_timeout}s")
            return response.status_code, body


def _caller_from(body: bytes) -> Caller:
    try:
        identity = json.loads(body)
        user_id = identity["user_id"]
    except (ValueError, KeyError, TypeError, RecursionError):
        log.warning("auth service answered 200 without a user_id")
        raise AuthServiceUnavailable() from None
    if isinstance(user_id, bool) or not isinstance(user_id, (str, int)):
        raise AuthServiceUnavailable()
    # the saga's user_id column holds it: what it cannot store (too long, NUL, a lone surrogate)
    # is an auth service outside the contract, not a database outage
    user_id = str(user_id)
    if storable_text(user_id, max_length=MAX_USER_ID_LENGTH) != user_id or user_id == "":
        log.warning("auth service answered a user_id the service cannot store", extra={"length": len(user_id)})
        raise AuthServiceUnavailable()
    return Caller(user_id=user_id, is_staff=identity.get("is_staff") is True)


_client: AuthClient | None = None


def auth_client() -> AuthClient:
    global _client
    if _client is None:
        _client = AuthClient(settings.AUTH_VERIFY_URL, timeout=settings.AUTH_TIMEOUT_SECONDS)
    return _client


@receiver(setting_changed)
def _forget_client(*, setting: str, **kwargs) -> None:
    """Settings changed at run time (tests do): the next call makes a client from the new ones."""
    global _client
    if setting in ("AUTH_VERIFY_URL", "AUTH_TIMEOUT_SECONDS", "WEB_THREADS"):
        _client = None


class _FailOpenThrottle(throttling.SimpleRateThrottle):
    """A throttle protects the service; when its counters (Redis) are away, it lets requests through."""

    def allow_request(self, request, view):
        try:
            return super().allow_request(request, view)
        except Exception as error:  # django-redis raises its own ConnectionInterrupted
            log.warning("API throttle not applied: %r", error)
            return True


class CallerRateThrottle(_FailOpenThrottle):
    """API_THROTTLE_USER per authenticated caller; no limit while it is unset."""

    scope = "user"

    def get_rate(self):
        return settings.API_THROTTLE_USER

    def get_cache_key(self, request, view):
        user_id = getattr(request.user, "user_id", None)
        return None if user_id is None else self.cache_format % {"scope": self.scope, "ident": user_id}


class AddressRateThrottle(_FailOpenThrottle):
    """API_THROTTLE_ANON per client address, counted before the token is checked; none while unset."""

    scope = "anon"

    def get_rate(self):
        return settings.API_THROTTLE_ANON

    def get_cache_key(self, request, view):
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class BearerTokenAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        address_limit = AddressRateThrottle()
        if not address_limit.allow_request(request, None):
            raise exceptions.Throttled(wait=address_limit.wait())
        header = request.META.get("HTTP_AUTHORIZATION", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise exceptions.NotAuthenticated("Send 'Authorization: Bearer <token>'.")
        if not BEARER_TOKEN.match(token.strip()):
            raise exceptions.AuthenticationFailed("A bearer token is 1 to 4096 visible ASCII characters.")
        caller = auth_client().verify(header)
        if caller is None:
            raise exceptions.AuthenticationFailed("The token was rejected by the auth service.")
        return caller, token

    def authenticate_header(self, request):
        return "Bearer"
