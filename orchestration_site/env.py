"""Typed readers for environment variables.

Every reader names the variable in its error, so a bad value stops the process at start
with a message a person can act on.
"""
import os


class ConfigError(Exception):
    pass


def _raw(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return value
    return None


def env_str(*names: str, default: str | None = None) -> str | None:
    value = _raw(*names)
    return default if value is None else value


def env_int(*names: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    value = _raw(*names)
    name = next((n for n in names if os.environ.get(n)), names[0])
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        upper = "" if maximum is None else f" and at most {maximum}"
        raise ConfigError(f"{name} must be at least {minimum}{upper}, got {number}")
    return number


def env_seconds(name: str, default: float) -> float:
    value = _raw(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from None
    if not 0 < seconds < 86400:
        raise ConfigError(f"{name} must be more than 0 and less than 86400 seconds, got {value!r}")
    return seconds


def env_bool(name: str, default: bool = False) -> bool:
    value = _raw(name)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {value!r}")


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in (env_str(name, default=default) or "").split(",") if item.strip()]


def env_float(name: str, default: float, *, minimum: float, maximum: float) -> float:
    value = _raw(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not minimum <= number <= maximum:  # also refuses nan
        raise ConfigError(f"{name} must be at least {minimum} and at most {maximum}, got {value!r}")
    return number
