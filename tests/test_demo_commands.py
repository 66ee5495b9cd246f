"""The demo's commands (demo/guard.py): seed_sagas and create_demo_staff run under the demo and
test settings only. Anywhere else they refuse before writing anything; under production settings
they do not even exist (the demo app is not installed)."""
import io
import os
import subprocess
import sys

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from demo.management.commands import create_demo_staff, seed_sagas
from lab.stack import ROOT
from sagas.models import Saga

COMMANDS = [("seed_sagas", seed_sagas.Command, {"count": 5}), ("create_demo_staff", create_demo_staff.Command, {})]


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "command", "options"), COMMANDS)
def test_a_demo_command_refuses_where_the_settings_do_not_say_demo(settings, django_user_model, name, command, options):
    settings.DEBUG = True  # create_demo_staff's own rule is met: only the demo rule refuses
    settings.DEMO = False
    with pytest.raises(CommandError, match=f"refusing to run {name} outside the demo and test settings"):
        call_command(command(), stdout=io.StringIO(), **options)
    assert not Saga.objects.exists() and not django_user_model.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "command", "options"), COMMANDS)
def test_a_demo_command_refuses_where_the_demo_app_is_not_installed(settings, django_user_model, name, command, options):
    settings.DEBUG = True
    settings.INSTALLED_APPS = [app for app in settings.INSTALLED_APPS if app != "demo"]  # DEMO stays True
    with pytest.raises(CommandError, match=f"refusing to run {name}"):
        call_command(command(), stdout=io.StringIO(), **options)
    assert not Saga.objects.exists() and not django_user_model.objects.exists()


@pytest.mark.django_db
def test_the_demo_commands_run_under_the_demo_settings(settings, django_user_model):
    settings.DEBUG = True
    out = io.StringIO()
    call_command("seed_sagas", count=5, stdout=out)
    call_command("create_demo_staff", "--username", "demo-support", stdout=out)
    assert Saga.objects.count() == 5
    assert django_user_model.objects.get(username="demo-support").is_staff


@pytest.mark.parametrize("name", ["seed_sagas", "create_demo_staff", "run_demo_participants"])
def test_production_settings_do_not_have_the_demo_commands(tmp_path, name):
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "orchestration_site.settings", "DJANGO_DEBUG": "1",
                   "DATABASE_URL": f"sqlite:///{tmp_path / 'untouched.sqlite3'}"}
    result = subprocess.run([sys.executable, "manage.py", name], cwd=ROOT, env=environment, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert f"Unknown command: '{name}'" in result.stderr
    assert not (tmp_path / "untouched.sqlite3").exists()
