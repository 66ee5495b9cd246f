"""Demo auth service (contract section 3): GET {AUTH_VERIFY_PATH} with `Authorization: Bearer <token>`.

A demo token (see catalogue.TOKENS) gets 200 {"user_id", "is_staff"}; anything else 401 {"detail"}.
Runs in a thread so tests can start it in-process:

    server = serve_auth(0)            # 0: any free port, read it from server.server_port
    ...
    server.shutdown(); server.server_close()
"""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from django.conf import settings

from demo.catalogue import TOKENS

log = logging.getLogger(__name__)


def default_auth_port() -> int:
    return urlsplit(settings.AUTH_VERIFY_URL).port or 80


def verify_token(authorization: str | None) -> tuple[int, dict]:
    """The status and JSON body the auth service answers for this Authorization header."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return 401, {"detail": "missing bearer token"}
    user = TOKENS.get(token.strip())
    if user is None:
        return 401, {"detail": "unknown token"}
    return 200, {"user_id": user.user_id, "is_staff": user.is_staff}


class _AuthHandler(BaseHTTPRequestHandler):
    verify_path = "/auth/verify"  # set per server by serve_auth
    # keep-alive: the orchestrator's client reuses its connections, as it would with a real auth service
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes: don't wait for an ACK

    def do_GET(self) -> None:
        if urlsplit(self.path).path != self.verify_path:
            self._answer(404, {"detail": "not found"})
            return
        status, body = verify_token(self.headers.get("Authorization"))
        self._answer(status, body)

    def _answer(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("auth request: " + format, *args)


class _AuthServer(ThreadingHTTPServer):
    request_queue_size = 128  # many clients connect at once under load
    daemon_threads = True


def serve_auth(port: int | None = None, *, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Start the auth service on `host` (the loopback unless told) in a daemon thread and return the running server."""
    handler = type("AuthHandler", (_AuthHandler,), {"verify_path": settings.AUTH_VERIFY_PATH})
    server = _AuthServer((host, default_auth_port() if port is None else port), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="demo-auth", daemon=True).start()
    log.info("demo auth service listening", extra={"port": server.server_port, "path": handler.verify_path})
    return server
