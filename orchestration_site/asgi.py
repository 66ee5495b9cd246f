"""HTTP and websockets on one port: Django for HTTP, channels for the admin's live pages.

HTTP goes to Django's WSGI handler on a thread pool (a2wsgi): every view and middleware here is
synchronous, and Django's own ASGI handler would move each request between the event loop and
a worker thread some thirty times (each sync middleware hook is its own hop), about 4 ms a request.
"""
import os

from a2wsgi import WSGIMiddleware
from django.conf import settings
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestration_site.settings")
django_http_app = WSGIMiddleware(get_wsgi_application(), workers=settings.WEB_THREADS)

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs the apps loaded)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from sagas.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_http_app,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
