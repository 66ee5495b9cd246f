"""Test settings: the production settings, on PostgreSQL and a Redis database of their own, plus the demo app."""
import os

os.environ.setdefault("DJANGO_SECRET_KEY", "tests-only-not-secret")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/orchestrator")
os.environ.setdefault("REDIS_DB", "1")
os.environ.setdefault("RABBITMQ_VHOST", "orchestrator-tests")  # tools/test_setup.sh creates it

from orchestration_site.settings import *  # noqa: E402,F401,F403
from orchestration_site.settings import INSTALLED_APPS  # noqa: E402

INSTALLED_APPS = [*INSTALLED_APPS, "demo"]
DEMO = True  # the demo's commands run here (demo/guard.py)
STATIC_ROOT = None  # tests serve no collected static files
WHITENOISE_USE_FINDERS = True
# Most tests look for dead letters in saga.replies.dead itself; tests/test_dead_letters.py turns
# the consumer's filing of them into the console's table on where it tests it.
DEAD_LETTER_FILE_EVERY_SECONDS = 0.0
# Each readiness test asks afresh; tests/test_health.py shows the sharing with the production period.
READINESS_CACHE_SECONDS = 0.0
