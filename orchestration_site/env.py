"""Typed readers for environment variables.

Every reader names the variable in its error, so a bad value stops the process at start
with a message a person can act on.

Any variable NAME may instead be given as NAME_FILE, the path of a file that holds the value
(Docker and Kubernetes secrets), so secrets never sit in the environment or an image. The value
is the file's content without one trailing newline (as `echo` writes it). Setting both NAME and
NAME_FILE is an error, as in the official postgres image: neither silently wins.
"""
import ipaddress
import os


class ConfigError(Exception):
    pass


def _from_file(name: str) -> str | None:
    path = os.environ.get(f"{name}_FILE")
    if path in (None, ""):
        return None
    if os.environ.get(name) not in (None, ""):
        raise ConfigError(f"set {name} or {name}_FILE, not both")
    try:
        with open(path, encoding="utf-8", newline="") as secret:
            value = secret.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{name}_FILE: cannot read {path!r}: {error}") from None
    value = value.removesuffix("\n")  # the one `echo` adds; the rest is the secret, byte for byte
    if value == "":
        raise ConfigError(f"{name}_FILE: {path!r} is empty")
    return value


def _named(*names: str) -> tuple[str, str | None]:
    """(the variable that gave the value, the value) for the first of `names` that is set."""
    for name in names:
        value = _from_file(name)
        if value is not None:
            return f"{name}_FILE", value
        value = os.environ.get(name)
        if value not in (None, ""):
            return name, value
    return names[0], None


def _raw(*names: str) -> str | None:
    return _named(*names)[1]


def env_str(*names: str, default: str | None = None) -> str | None:
    value = _raw(*names)
    return default if value is None else value


def env_int(*names: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    name, value = _named(*names)
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
    name, value = _named(name)
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
    name, value = _named(name)
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
    name, value = _named(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not minimum <= number <= maximum:  # also refuses nan
        raise ConfigError(f"{name} must be at least {minimum} and at most {maximum}, got {value!r}")
    return number


RATE_PERIODS = ("s", "sec", "m", "min", "h", "hour", "d", "day")


def env_rate(name: str) -> str | None:
    """A request rate as DRF throttles read it ('100/s', '20/min'); None when unset."""
    name, value = _named(name)
    if value is None:
        return None
    count, _, period = value.strip().partition("/")
    if not (count.isdigit() and int(count) > 0 and period in RATE_PERIODS):
        raise ConfigError(f"{name} must be a rate like 100/s or 20/min ({', '.join(RATE_PERIODS)}), got {value!r}")
    return value.strip()


def env_choice(name: str, choices: tuple[str, ...], *, default: str) -> str:
    variable, value = _named(name)
    if value is None:
        return default
    if value.strip() not in choices:
        raise ConfigError(f"{variable} must be one of {', '.join(choices)}, got {value!r}")
    return value.strip()


def env_networks(name: str, default: str) -> list:
    """Comma-separated CIDRs ('10.0.0.0/8,::1/128') as ipaddress networks."""
    networks = []
    for item in env_list(name, default):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"{name} must be comma-separated addresses or networks like 10.0.0.0/8, got {item!r}") from None
    return networks
