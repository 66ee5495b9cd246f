import signal

from django.core.management.base import BaseCommand

from sagas import health
from sagas.broker import Broker
from sagas.consumer import SagaConsumer
from sagas.runtime import Runtime


class Command(BaseCommand):
    help = "Consume participants' replies from saga.replies and drive the sagas (resends, compensations, events)."

    def add_arguments(self, parser):
        parser.add_argument("--prefetch", type=int, default=50, help="unacked replies held at once")
        parser.add_argument("--metrics-port", type=int, default=None, help="serve metrics here (default: CONSUMER_METRICS_PORT)")

    def handle(self, *args, prefetch: int, metrics_port: int | None, **options):
        health.consumer_started(metrics_port=metrics_port)
        # this process's connection, publisher and threads: built here, passed to what it calls
        consumer = SagaConsumer(Runtime.for_consumer(Broker()), prefetch=prefetch)
        signal.signal(signal.SIGTERM, consumer.stop)
        signal.signal(signal.SIGINT, consumer.stop)
        consumer.run()
