"""`make run`'s preflight (lab/demo.py): a dependency that does not answer is named with the way
to start it, and nothing is started; a bad configuration value is one line, not a traceback."""
import os
import subprocess
import sys

import pytest

from lab.stack import ROOT, free_port


def run_demo(tmp_path, **env) -> subprocess.CompletedProcess:
    # SQLite in tmp_path unless the test says otherwise: the checks of the other two stand alone
    environment = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}", "PORT": str(free_port()), **env}
    # a deadline: a preflight that hung, or a demo that started, fails here instead of waiting forever
    return subprocess.run([sys.executable, "-m", "lab.demo"], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("variables", "named", "how"), [
    ({"RABBITMQ_PORT": "{port}"}, "RabbitMQ does not answer at localhost:{port}", "rabbitmq-server -detached"),
    ({"REDIS_PORT": "{port}"}, "Redis does not answer at localhost:{port}", "redis-server --daemonize yes"),
    ({"DATABASE_URL": "postgres://postgres@127.0.0.1:{port}/orchestrator"},
     "PostgreSQL does not answer at 127.0.0.1:{port}", "pg_ctlcluster"),
])
def test_a_dependency_that_does_not_answer_is_named_with_how_to_start_it(tmp_path, variables, named, how):
    port = free_port()
    result = run_demo(tmp_path, **{name: value.format(port=port) for name, value in variables.items()})
    assert result.returncode == 1
    assert named.format(port=port) in result.stderr
    assert how in result.stderr and "docker run" in result.stderr
    assert result.stderr.count("does not answer") == 1  # the two others answer, and are not blamed
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "demo.sqlite3").exists()  # nothing was started: not even the migration


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("SAGA_STEP_TIMEOUT_SECONDS", "soon", "SAGA_STEP_TIMEOUT_SECONDS must be a number of seconds, got 'soon'"),
    ("PORT", "http", "PORT must be an integer, got 'http'"),
    ("REDIS_DB", "99", "REDIS_DB must be at least 0 and at most 15, got 99"),
    ("DJANGO_DEBUG", "maybe", "DJANGO_DEBUG must be 1 or 0, got 'maybe'"),
    ("DATABASE_URL", "nosuchdb://x", "DATABASE_URL is not a database URL"),
])
def test_a_bad_configuration_value_is_one_line(tmp_path, variable, value, message):
    result = run_demo(tmp_path, **{variable: value})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"configuration error: {message}")
