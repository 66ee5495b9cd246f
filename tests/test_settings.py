"""Bad configuration stops the process at start with a message naming the variable."""
import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.stack import ROOT
from orchestration_site.env import ConfigError, env_str


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


# secrets from files (NAME_FILE), read at run time

def settings_of(*names, **env):
    """The named settings, as the process started with only `env` of the DJANGO_/SAGA_/DATABASE_ variables sees them."""
    code = f"from django.conf import settings; import json; print(json.dumps([{', '.join(names)}]))"
    dropped = ("DJANGO_", "SAGA_", "DATABASE_", "RABBITMQ_PASSWORD")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    environment.update(env)
    result = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def secret_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return str(path)


def test_the_four_secrets_are_read_from_their_files_at_start(tmp_path):
    values = settings_of(
        "settings.SECRET_KEY", "settings.RABBITMQ['password']", "settings.REDIS_PASSWORD",
        "settings.DATABASES['default']['NAME']",
        DJANGO_SECRET_KEY_FILE=secret_file(tmp_path, "key", "k" * 50 + "\n"),
        RABBITMQ_PASSWORD_FILE=secret_file(tmp_path, "rabbit", "s3cret with spaces\n"),
        REDIS_PASSWORD_FILE=secret_file(tmp_path, "redis", "r3dis"),
        DATABASE_URL_FILE=secret_file(tmp_path, "db", "postgres://u:p@db:5432/from_file\n"),
    )
    assert values == ["k" * 50, "s3cret with spaces", "r3dis", "from_file"]


@pytest.mark.parametrize("variable", ["DJANGO_SECRET_KEY", "RABBITMQ_PASSWORD", "REDIS_PASSWORD", "DATABASE_URL"])
def test_an_unreadable_secret_file_stops_the_process_naming_the_variable(tmp_path, variable):
    result = start(**{"DJANGO_SECRET_KEY": "x" * 50, variable: "", f"{variable}_FILE": str(tmp_path / "missing")})
    assert result.returncode != 0
    assert f"{variable}_FILE" in result.stderr and "missing" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("env", "error"), [
    ({"RABBITMQ_PASSWORD": "a", "RABBITMQ_PASSWORD_FILE": "{file}"}, "set RABBITMQ_PASSWORD or RABBITMQ_PASSWORD_FILE, not both"),
    ({"RABBITMQ_PASSWORD_FILE": "{dir}"}, "RABBITMQ_PASSWORD_FILE: cannot read"),
    ({"RABBITMQ_PASSWORD_FILE": "{empty}"}, "RABBITMQ_PASSWORD_FILE: "),
    ({"RABBITMQ_PASSWORD_FILE": "{latin1}"}, "RABBITMQ_PASSWORD_FILE: cannot read"),
])
def test_a_secret_file_that_cannot_give_one_value_is_a_config_error(tmp_path, monkeypatch, env, error):
    paths = {"file": secret_file(tmp_path, "f", "b\n"), "dir": str(tmp_path), "empty": secret_file(tmp_path, "e", "\n")}
    (tmp_path / "l").write_bytes(b"caf\xe9")
    paths["latin1"] = str(tmp_path / "l")
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(**paths))
    with pytest.raises(ConfigError, match=error):
        env_str("RABBITMQ_PASSWORD", default="guest")


@settings(max_examples=200)
@given(value=st.text(min_size=1).filter(lambda v: not v.endswith("\n")), newline=st.booleans())
def test_a_secret_file_holds_its_value_byte_for_byte_but_for_one_trailing_newline(tmp_path_factory, value, newline):
    path = tmp_path_factory.mktemp("secret") / "value"
    path.write_bytes((value + ("\n" if newline else "")).encode())
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("REDIS_PASSWORD", raising=False)
        patch.setenv("REDIS_PASSWORD_FILE", str(path))
        assert env_str("REDIS_PASSWORD") == value


@pytest.mark.parametrize(("name", "value"), [("SAGA_RETRY_BACKOFF", "0.5"), ("SAGA_RETRY_BACKOFF", "nan"),
                                             ("SAGA_RETRY_BACKOFF", "twice"), ("SAGA_RETRY_MAX_SECONDS", "0")])
def test_retry_backoff_and_cap_are_validated(name, value):
    result = start(DJANGO_DEBUG="1", **{name: value})
    assert result.returncode != 0 and name in result.stderr and "Traceback" not in result.stderr


def test_fractional_retry_backoff_and_cap_are_accepted():
    result = start(DJANGO_DEBUG="1", SAGA_RETRY_BACKOFF="1.5", SAGA_RETRY_MAX_SECONDS="90.5")
    assert result.returncode == 0, result.stderr


def test_consumers_file_dead_letters_for_the_console_unless_told_not_to():
    assert settings_of("settings.DEAD_LETTER_FILE_EVERY_SECONDS", DJANGO_SECRET_KEY="x" * 50) == [5.0]
    assert settings_of("settings.DEAD_LETTER_FILE_EVERY_SECONDS", DJANGO_SECRET_KEY="x" * 50,
                       DEAD_LETTER_FILE_EVERY_SECONDS="0") == [0.0]
