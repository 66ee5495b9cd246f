from django.apps import AppConfig


class SagasConfig(AppConfig):
    name = "sagas"
    verbose_name = "Order sagas"

    def ready(self):
        from sagas import admin_dead_letters, live_socket, runtime, schema  # noqa: F401  (register the dead letters' admin, the logout signal and the OpenAPI auth extension)

        # the process's runtime, for the web and the commands that start sagas (the consumer
        # builds its own); it connects and starts threads on first use only, so after any fork
        runtime.install(runtime.Runtime.for_web())
