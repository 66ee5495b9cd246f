"""`make run`'s settings: production's, plus the demo app, debug on unless DJANGO_DEBUG=0.

Not in the production image (the Dockerfile's source stage leaves it with the demo)."""
import os

os.environ.setdefault("DJANGO_DEBUG", "1")  # before the import: settings.py reads it (and the secret key rule) there

from orchestration_site.settings import *  # noqa: E402,F401,F403
from orchestration_site.settings import INSTALLED_APPS  # noqa: E402

INSTALLED_APPS = [*INSTALLED_APPS, "demo"]
# the demo's commands (seed_sagas, create_demo_staff) run only where this is set
DEMO = True
