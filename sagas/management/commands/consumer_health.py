"""The consumer's liveness probe: exit 0 when its loop turned recently, 1 (with why) when not."""
from django.conf import settings
from django.core.management.base import BaseCommand

from sagas.health import judge_heartbeat


class Command(BaseCommand):
    help = ("Exit 0 if the saga consumer's loop turned within CONSUMER_HEARTBEAT_MAX_AGE_SECONDS, else 1. "
            "Reads the heartbeat file (in the consumer's container) or, with --source redis, the consumer's "
            "Redis key (from any host).")

    def add_arguments(self, parser):
        parser.add_argument("--source", choices=("file", "redis"), default="file",
                            help="where the consumer's heartbeat is read (default: file)")
        parser.add_argument("--name", default=None, help="the consumer's CONSUMER_NAME (default: this one's)")
        parser.add_argument("--file", default=None, help="the heartbeat file (default: CONSUMER_HEARTBEAT_FILE)")
        parser.add_argument("--max-age", type=float, default=None,
                            help="seconds (default: CONSUMER_HEARTBEAT_MAX_AGE_SECONDS)")

    def handle(self, *args, source: str, name: str | None, file: str | None, max_age: float | None, **options):
        verdict = judge_heartbeat(
            name=name or settings.CONSUMER_NAME, source=source, path=file or settings.CONSUMER_HEARTBEAT_FILE,
            max_age=settings.CONSUMER_HEARTBEAT_MAX_AGE_SECONDS if max_age is None else max_age)
        if not verdict.healthy:
            self.stderr.write(f"unhealthy: {verdict.message}")
            raise SystemExit(1)
        self.stdout.write(f"healthy: {verdict.message}")
