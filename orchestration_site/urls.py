from django.contrib import admin
from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.renderers import JSONRenderer
from rest_framework.routers import SimpleRouter

from sagas.api import OrderViewSet, SagaViewSet, liveness
from sagas.health import readyz
from sagas.metrics import metrics_view


class JSONErrors:
    """The schema and docs views answer errors (a PUT, say) in JSON like the API, not in YAML or HTML."""

    def finalize_response(self, request, response, *args, **kwargs):
        if response.exception:
            request.accepted_renderer, request.accepted_media_type = JSONRenderer(), JSONRenderer.media_type
        return super().finalize_response(request, response, *args, **kwargs)


class SchemaView(JSONErrors, SpectacularAPIView):
    pass


class DocsView(JSONErrors, SpectacularSwaggerView):
    pass


router = SimpleRouter(trailing_slash=False)
router.register("orders", OrderViewSet, basename="orders")
router.register("sagas", SagaViewSet, basename="sagas")

urlpatterns = [
    path("", liveness, name="liveness"),
    path("readyz", readyz, name="readyz"),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("api/schema/", SchemaView.as_view(authentication_classes=[], permission_classes=[]), name="schema"),
    path("api/docs/", DocsView.as_view(url_name="schema", authentication_classes=[], permission_classes=[]),
         name="docs"),
    *router.urls,
]

handler400 = "sagas.api.bad_request"
handler403 = "sagas.api.permission_denied"
handler404 = "sagas.api.not_found"
handler500 = "sagas.api.server_error"
