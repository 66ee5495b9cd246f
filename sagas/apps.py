from django.apps import AppConfig


class SagasConfig(AppConfig):
    name = "sagas"
    verbose_name = "Order sagas"

    def ready(self):
        from sagas import live_socket, schema  # noqa: F401  (register the logout signal and the OpenAPI auth extension)
