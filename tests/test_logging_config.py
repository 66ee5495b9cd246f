"""One format for every line a process prints, uvicorn's included (orchestration_site/logging_config.py)."""
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.stack import ROOT, Stack, free_port
from orchestration_site.env import ConfigError
from orchestration_site.logfmt import LogfmtFormatter, parse
from orchestration_site.logging_config import JsonFormatter, WithoutColour, service_logging
from tests.test_logfmt import any_text, extra_keys, record

PARSERS = {"logfmt": parse, "json": json.loads}


def web_log(tmp_path, log_format: str, *, access_log: bool = True) -> list[str]:
    """The lines the real web process printed while it served a few requests, one with a path
    that carries escapes and quotes into the access log."""
    stack = Stack.create(log_dir=tmp_path, web_port=free_port(), DJANGO_DEBUG="1", LOG_FORMAT=log_format,
                         DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    stack.start_web(access_log=access_log)
    try:
        stack.wait_web(timeout=60)
        for path in ("/", "/no-such-page", '/%0d%0a%1b%5B31m%22=x%20y'):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{stack.web_port}{path}", timeout=10).read()
            except urllib.error.HTTPError:
                pass
    finally:
        stack.stop_all()
    return (tmp_path / "web.log").read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("log_format", PARSERS)
def test_every_line_of_the_web_process_parses_uvicorns_included(tmp_path, log_format):
    lines = web_log(tmp_path, log_format)
    parsed = [PARSERS[log_format](line) for line in lines]  # raises on any line that is not one
    assert all({"ts", "level", "logger", "msg"} <= set(fields) for fields in parsed)
    loggers = {fields["logger"] for fields in parsed}
    assert {"uvicorn.error", "uvicorn.access", "django.request"} <= loggers
    assert not [fields for fields in parsed if "color_message" in fields]
    access = [fields["msg"] for fields in parsed if fields["logger"] == "uvicorn.access"]
    assert any('"GET /no-such-page HTTP/1.1" 404' in msg for msg in access)
    assert len([fields for fields in parsed if fields["msg"] == "Not Found: /no-such-page"]) == 1  # once, not twice


def test_no_access_log_still_means_none(tmp_path):
    parsed = [parse(line) for line in web_log(tmp_path, "logfmt", access_log=False)]
    assert "uvicorn.error" in {fields["logger"] for fields in parsed}
    assert "uvicorn.access" not in {fields["logger"] for fields in parsed}


@settings(max_examples=300)
@given(name=any_text, msg=any_text, extras=st.dictionaries(extra_keys, any_text, max_size=4))
def test_a_json_line_is_one_line_with_the_fields_of_the_logfmt_line(name, msg, extras):
    made = record(name=name, msg=msg, extras=extras)
    line = JsonFormatter().format(made)
    assert line.splitlines() == [line] and line.isascii()
    assert json.loads(line) == parse(LogfmtFormatter().format(made))


def test_the_colour_copy_of_uvicorns_messages_is_dropped():
    made = record(name="uvicorn.error", msg="Started", extras={"color_message": "\x1b[36mStarted\x1b[0m", "pid": 7})
    assert WithoutColour().filter(made)
    assert parse(LogfmtFormatter().format(made)).keys() == {"ts", "level", "logger", "msg", "pid"}


@pytest.mark.parametrize(("log_format", "level", "message"), [
    ("xml", None, "LOG_FORMAT must be one of logfmt, json, got 'xml'"),
    (None, "LOUD", "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'"),
])
def test_a_bad_log_format_or_level_is_a_configuration_error(log_format, level, message):
    with pytest.raises(ConfigError, match=message):
        service_logging(log_format=log_format, level=level)


def test_a_bad_log_format_stops_a_command_with_one_line():
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**Stack.create(log_dir=ROOT / "var" / "log").env, "LOG_FORMAT": "yaml"})
    assert result.returncode == 1
    assert result.stderr.strip() == "configuration error: LOG_FORMAT must be one of logfmt, json, got 'yaml'"
