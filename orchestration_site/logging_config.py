"""One format for every line a process prints: Django's, the service's and uvicorn's own.

LOG_FORMAT picks it: `logfmt` (the default, orchestration_site.logfmt) or `json` (one JSON
object a line, the same fields). Every record goes to the root logger's one handler. uvicorn
configures its loggers before it imports the application, so the web process is started with
`--log-config orchestration_site/uvicorn_logging.json`, which gives uvicorn's loggers no handler
of their own: their records reach the root handler configured here once Django is set up. (The
file keeps `--no-access-log` working, where a reconfiguration of uvicorn.access would undo it.)
"""
import json
import logging

from orchestration_site.env import ConfigError
from orchestration_site.logfmt import LogfmtFormatter, parse

FORMATTERS = {"logfmt": "orchestration_site.logfmt.LogfmtFormatter",
              "json": "orchestration_site.logging_config.JsonFormatter"}
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
UVICORN_LOG_CONFIG = "orchestration_site/uvicorn_logging.json"


class JsonFormatter(LogfmtFormatter):
    """The logfmt line's fields as one JSON object. The logfmt line parses back to the exact text
    of each field, so both formats carry the same fields; ensure_ascii escapes every control
    character and lone surrogate, so a value can neither end the line nor break its encoding."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(parse(super().format(record)), ensure_ascii=True)


class WithoutColour(logging.Filter):
    """uvicorn adds each message again with terminal colour codes (`color_message`) for its own
    formatter: the same text twice, so it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


def service_logging(*, log_format: str | None, level: str | None) -> dict:
    """Django's LOGGING for LOG_FORMAT and LOG_LEVEL (None: the defaults, logfmt and INFO)."""
    log_format = (log_format or "logfmt").strip().lower()
    if log_format not in FORMATTERS:
        raise ConfigError(f"LOG_FORMAT must be one of {', '.join(FORMATTERS)}, got {log_format!r}")
    level = (level or "INFO").strip().upper()
    if level not in LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LEVELS)}, got {level!r}")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"service": {"()": FORMATTERS[log_format]}},
        "filters": {"without_colour": {"()": "orchestration_site.logging_config.WithoutColour"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "service", "filters": ["without_colour"]}},
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            "pika": {"level": "CRITICAL"},  # sagas.broker logs what matters
            # Django's default handlers print a second, bare line in debug mode (and would mail
            # ADMINS): the root handler prints them once, in the one format
            "django": {"handlers": [], "level": level, "propagate": True},
            "django.server": {"handlers": [], "propagate": True},
        },
    }
