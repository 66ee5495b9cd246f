from django.apps import AppConfig


class SagasConfig(AppConfig):
    name = "sagas"
    verbose_name = "Order sagas"

    def ready(self):
        from sagas import admin_dead_letters, live_socket, schema  # noqa: F401  (register the dead letters' admin, the logout signal and the OpenAPI auth extension)
