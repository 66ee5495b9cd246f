from django.urls import path

from sagas.live_socket import SagaProgressSocket

websocket_urlpatterns = [
    path("ws/sagas/", SagaProgressSocket.as_asgi()),
    path("ws/sagas/<uuid:saga_id>/", SagaProgressSocket.as_asgi()),
]
