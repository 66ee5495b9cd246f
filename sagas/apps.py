from django.apps import AppConfig


class SagasConfig(AppConfig):
    name = "sagas"
    verbose_name = "Order sagas"

    def ready(self):
        from sagas import schema  # noqa: F401  (registers the OpenAPI auth extension)
