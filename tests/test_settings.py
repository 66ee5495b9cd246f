"""Bad configuration stops the process at start with a message naming the variable."""
import os
import subprocess
import sys

import pytest

from tools.stack import ROOT


def start(*args, **env):
    """`manage.py check *args` with only `env` of the DJANGO_, SAGA_ and DATABASE_ variables."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "SAGA_", "DATABASE_"))}
    environment.update(env)
    return subprocess.run([sys.executable, "manage.py", "check", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "DJANGO_SECRET_KEY"),
        ({"DJANGO_DEBUG": "1", "SAGA_STEP_TIMEOUT_SECONDS": "soon"}, "SAGA_STEP_TIMEOUT_SECONDS"),
        ({"DJANGO_DEBUG": "1", "SAGA_STEP_TIMEOUT_SECONDS": "-1"}, "SAGA_STEP_TIMEOUT_SECONDS"),
        ({"DJANGO_DEBUG": "1", "SAGA_STEP_MAX_ATTEMPTS": "0"}, "SAGA_STEP_MAX_ATTEMPTS"),
        ({"DJANGO_DEBUG": "1", "RABBITMQ_PORT": "amqp"}, "RABBITMQ_PORT"),
        ({"DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG"),
        ({"DJANGO_DEBUG": "1", "AUTHERIZATION_SERVER_HOST": "auth.local"}, "AUTHERIZATION_SERVER_HOST"),
        ({"DJANGO_DEBUG": "1", "AUTHORIZATION_SERVER_PORT": "x"}, "AUTHORIZATION_SERVER_PORT"),
        ({"DJANGO_DEBUG": "1", "DATABASE_URL": "nosuchdb://x"}, "DATABASE_URL"),
    ],
)
def test_a_bad_value_stops_the_process_naming_the_variable(env, named):
    result = start(**env)
    assert result.returncode != 0
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def test_fractional_timeouts_and_the_auth_alias_are_accepted():
    result = start(DJANGO_SECRET_KEY="x" * 50, SAGA_STEP_TIMEOUT_SECONDS="0.5", AUTHORIZATION_SERVER_HOST="http://auth",
                   AUTHORIZATION_SERVER_PORT="8086")
    assert result.returncode == 0, result.stderr


def test_production_settings_pass_the_deploy_checks():
    result = start("--deploy", "--fail-level", "WARNING", DJANGO_SECRET_KEY="a-long-random-production-secret-" + "k3y" * 20)
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize(("name", "value"), [("SAGA_RETRY_BACKOFF", "0.5"), ("SAGA_RETRY_BACKOFF", "nan"),
                                             ("SAGA_RETRY_BACKOFF", "twice"), ("SAGA_RETRY_MAX_SECONDS", "0")])
def test_retry_backoff_and_cap_are_validated(name, value):
    result = start(DJANGO_DEBUG="1", **{name: value})
    assert result.returncode != 0 and name in result.stderr and "Traceback" not in result.stderr


def test_fractional_retry_backoff_and_cap_are_accepted():
    result = start(DJANGO_DEBUG="1", SAGA_RETRY_BACKOFF="1.5", SAGA_RETRY_MAX_SECONDS="90.5")
    assert result.returncode == 0, result.stderr
