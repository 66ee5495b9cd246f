from django.contrib import admin
from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from sagas.api import OrderViewSet, SagaViewSet, liveness

router = SimpleRouter(trailing_slash=False)
router.register("orders", OrderViewSet, basename="orders")
router.register("sagas", SagaViewSet, basename="sagas")

urlpatterns = [
    path("", liveness, name="liveness"),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(authentication_classes=[], permission_classes=[]), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema", authentication_classes=[], permission_classes=[]),
         name="docs"),
    *router.urls,
]
