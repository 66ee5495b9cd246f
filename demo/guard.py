"""The demo's commands make accounts with printed passwords and made-up sagas: they run only
where the settings say demo or test, never against a production database."""
from django.apps import apps
from django.conf import settings
from django.core.management.base import CommandError


def require_demo_settings(command: str) -> None:
    """Raise CommandError unless the demo app is installed and the settings are the demo's or the tests'."""
    if not apps.is_installed("demo") or not getattr(settings, "DEMO", False):
        raise CommandError(f"refusing to run {command} outside the demo and test settings "
                           "(DJANGO_SETTINGS_MODULE=orchestration_site.settings_demo)")
