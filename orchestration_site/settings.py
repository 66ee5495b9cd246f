"""Settings, read from the environment (see the configuration table in README.md)."""
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import dj_database_url

from orchestration_site.env import (
    ConfigError,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_networks,
    env_rate,
    env_seconds,
    env_str,
)
from orchestration_site.logging_config import service_logging

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DJANGO_DEBUG", False)
SECRET_KEY = env_str("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ConfigError("DJANGO_SECRET_KEY is required unless DJANGO_DEBUG=1")
    SECRET_KEY = "insecure-debug-only-key"
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

# uvicorn takes PORT from the environment itself; reading it here stops a bad value at start-up
PORT = env_int("PORT", default=7001, minimum=1, maximum=65535)
# threads serving HTTP in the web process; the database pool and the auth client's pool match them
WEB_THREADS = env_int("WEB_THREADS", default=16, minimum=1, maximum=256)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served from here: /api/docs/ needs no CDN
    "channels",
    "axes",
    "sagas",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",  # last, as django-axes requires
]

ROOT_URLCONF = "orchestration_site.urls"
ASGI_APPLICATION = "orchestration_site.asgi.application"
WSGI_APPLICATION = "orchestration_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

try:
    DATABASES = {
        "default": dj_database_url.parse(
            env_str("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
        )
    }
except ValueError as error:
    raise ConfigError(f"DATABASE_URL is not a database URL: {error}") from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web and consumer write the same file: take the write lock at BEGIN and wait for it.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # requests run on a pool of threads: pool connections instead of keeping one per thread
    DATABASES["default"]["OPTIONS"] = {"pool": {"min_size": 1, "max_size": WEB_THREADS, "timeout": 5}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_HOST = env_str("REDIS_HOST", default="localhost")
REDIS_PORT = env_int("REDIS_PORT", default=6379, minimum=1, maximum=65535)
REDIS_DB = env_int("REDIS_DB", default=0, minimum=0, maximum=15)
REDIS_PASSWORD = env_str("REDIS_PASSWORD")
_redis_auth = f":{REDIS_PASSWORD}@" if REDIS_PASSWORD else ""
REDIS_URL = f"redis://{_redis_auth}{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "orchestrator",
        "OPTIONS": {
            "SOCKET_CONNECT_TIMEOUT": 1,
            "SOCKET_TIMEOUT": 1,
        },
    }
}
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": "orchestrator-live"},
    }
}

RABBITMQ = {
    "host": env_str("RABBITMQ_HOST", default="localhost"),
    "port": env_int("RABBITMQ_PORT", default=5672, minimum=1, maximum=65535),
    "user": env_str("RABBITMQ_USER", default="guest"),
    "password": env_str("RABBITMQ_PASSWORD", default="guest"),
    "vhost": env_str("RABBITMQ_VHOST", default="/"),
}
# quorum: the contract's queues are replicated over a RabbitMQ cluster (docs/operations.md#queue-type)
RABBITMQ_QUEUE_TYPE = env_choice("RABBITMQ_QUEUE_TYPE", ("classic", "quorum"), default="classic")

_auth_host = env_str("AUTHERIZATION_SERVER_HOST", "AUTHORIZATION_SERVER_HOST", default="http://localhost")
_auth_port = env_int("AUTHERIZATION_SERVER_PORT", "AUTHORIZATION_SERVER_PORT", default=5206, minimum=1, maximum=65535)
if not _auth_host.startswith(("http://", "https://")):
    raise ConfigError(f"AUTHERIZATION_SERVER_HOST must start with http:// or https://, got {_auth_host!r}")
AUTH_VERIFY_PATH = env_str("AUTH_VERIFY_PATH", default="/auth/verify")
if not AUTH_VERIFY_PATH.startswith("/"):
    raise ConfigError(f"AUTH_VERIFY_PATH must start with '/', got {AUTH_VERIFY_PATH!r}")
AUTH_VERIFY_URL = f"{_auth_host.rstrip('/')}:{_auth_port}{AUTH_VERIFY_PATH}"
AUTH_TIMEOUT_SECONDS = 2.0

SAGA_STEP_TIMEOUT_SECONDS = env_seconds("SAGA_STEP_TIMEOUT_SECONDS", 30.0)
SAGA_STEP_MAX_ATTEMPTS = env_int("SAGA_STEP_MAX_ATTEMPTS", default=3, minimum=1, maximum=100)
SAGA_COMPENSATION_MAX_ATTEMPTS = env_int("SAGA_COMPENSATION_MAX_ATTEMPTS", default=10, minimum=1, maximum=1000)
# each resend waits SAGA_RETRY_BACKOFF times longer than the wait before it, at most SAGA_RETRY_MAX_SECONDS
SAGA_RETRY_BACKOFF = env_float("SAGA_RETRY_BACKOFF", 2.0, minimum=1.0, maximum=100.0)
SAGA_RETRY_MAX_SECONDS = env_seconds("SAGA_RETRY_MAX_SECONDS", 300.0)

# The support console's door: the admin login is throttled (django-axes), passwords are checked,
# sessions are short.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", default=5, minimum=1, maximum=1000)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("AXES_COOLOFF_MINUTES", default=15, minimum=1, maximum=7 * 24 * 60))
# a username is locked from one address only, so nobody can lock a colleague out from elsewhere
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# proxies in front of the service that append to X-Forwarded-For (0: use the peer's address)
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", default=0, minimum=0, maximum=10)
if TRUSTED_PROXY_COUNT:
    AXES_IPWARE_PROXY_COUNT = TRUSTED_PROXY_COUNT
    AXES_IPWARE_META_PRECEDENCE_ORDER = ("HTTP_X_FORWARDED_FOR", "REMOTE_ADDR")
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
SESSION_COOKIE_AGE = env_int("SESSION_COOKIE_AGE", default=8 * 3600, minimum=60, maximum=30 * 24 * 3600)
SESSION_EXPIRE_AT_BROWSER_CLOSE = env_bool("SESSION_EXPIRE_AT_BROWSER_CLOSE", False)

# API throttles: off unless set (a shop's normal traffic must never meet a default limit).
# Counted in the Django cache (Redis). The per-address one is checked before the token goes to
# the auth service, so a flood of bad tokens stops here.
API_THROTTLE_USER = env_rate("API_THROTTLE_USER")
API_THROTTLE_ANON = env_rate("API_THROTTLE_ANON")


def _participant_users(raw: str | None) -> dict[str, str]:
    """PARTICIPANT_USERS=stock=stock-svc,payment=pay-svc,order=order-svc: the RabbitMQ user whose
    replies each participant's commands accept. Unset: any sender is believed."""
    from sagas.flows import ORDER_FLOW  # plain data, no models: safe before apps load

    if raw is None:
        return {}
    participants = {step.command.partition(".")[0] for step in ORDER_FLOW.steps}
    users = {}
    for item in raw.split(","):
        participant, equals, user = (part.strip() for part in item.partition("="))
        if not equals or not user or participant not in participants or participant in users:
            raise ConfigError(f"PARTICIPANT_USERS must be participant=user pairs, one for each of "
                              f"{', '.join(sorted(participants))}, got {raw!r}")
        users[participant] = user
    if set(users) != participants:
        raise ConfigError(f"PARTICIPANT_USERS names no user for {', '.join(sorted(participants - set(users)))}")
    return users


PARTICIPANT_USERS = _participant_users(env_str("PARTICIPANT_USERS"))

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["sagas.auth.BearerTokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "sagas.api.exception_handler",
    "UNAUTHENTICATED_USER": None,
    # OPTIONS gets 405 like any method a route does not serve
    "DEFAULT_METADATA_CLASS": None,
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "sagas.negotiation.JSONWhateverTheAccept",
    # \uXXXX escapes: a lone surrogate echoed back in an error cannot break the response's UTF-8
    "UNICODE_JSON": False,
    # a no-op while API_THROTTLE_USER is unset; API_THROTTLE_ANON is checked by sagas.auth
    "DEFAULT_THROTTLE_CLASSES": ["sagas.auth.CallerRateThrottle"],
    # X-Forwarded-For is believed only as far as TRUSTED_PROXY_COUNT proxies wrote it
    "NUM_PROXIES": TRUSTED_PROXY_COUNT,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Order orchestration API",
    "DESCRIPTION": ("Starts order sagas and reports their progress. The whole interface, HTTP and messages, is "
                    "docs/contract.md in this repository; the messages as AsyncAPI: docs/asyncapi.yaml."),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # no badge fetched from swagger.io's validator: the page talks to this service only
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
}
# The contract's 64 KiB limit on a request body; larger bodies get 413.
DATA_UPLOAD_MAX_MEMORY_SIZE = 64 * 1024

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
WHITENOISE_USE_FINDERS = DEBUG

# Production hardening. TLS ends at the load balancer, which also redirects http to https:
# the service itself speaks plain HTTP on PORT behind it (and to the participants' tests).
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", False)
SILENCED_SYSTEM_CHECKS = [] if SECURE_SSL_REDIRECT else ["security.W008"]
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
SECURE_HSTS_SECONDS = 0 if DEBUG else 31536000
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = not DEBUG
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# Operations (docs/operations.md). /metrics answers these client addresses only; others get 404.
METRICS_ALLOWED_CIDRS = env_networks("METRICS_ALLOWED_CIDRS", "127.0.0.1/32,::1/128")
# /readyz gives the database, Redis and the broker this long, together, to answer
READINESS_TIMEOUT_SECONDS = env_seconds("READINESS_TIMEOUT_SECONDS", 2.0)
# /readyz asks its dependencies at most this often; callers meanwhile share the last answer
READINESS_CACHE_SECONDS = env_float("READINESS_CACHE_SECONDS", 1.0, minimum=0.0, maximum=60.0)
# each consumer serves its metrics on this port (0: none), on CONSUMER_METRICS_HOST
CONSUMER_METRICS_PORT = env_int("CONSUMER_METRICS_PORT", default=0, minimum=0, maximum=65535)
CONSUMER_METRICS_HOST = env_str("CONSUMER_METRICS_HOST", default="127.0.0.1")
# the consumer's heartbeat: its name (one per consumer), the file it touches, and how old a beat
# may be before `consumer_health` calls the consumer stalled
CONSUMER_NAME = env_str("CONSUMER_NAME", default=socket.gethostname())
CONSUMER_HEARTBEAT_FILE = env_str("CONSUMER_HEARTBEAT_FILE",
                                  default=str(Path(tempfile.gettempdir()) / f"saga-consumer-{CONSUMER_NAME}.heartbeat"))
CONSUMER_HEARTBEAT_MAX_AGE_SECONDS = env_seconds("CONSUMER_HEARTBEAT_MAX_AGE_SECONDS", 60.0)
# how often each consumer files the dead-letter queue's messages into the console's table
# (sagas.dead_letters), where staff requeue or discard them; 0: they stay in saga.replies.dead
DEAD_LETTER_FILE_EVERY_SECONDS = env_float("DEAD_LETTER_FILE_EVERY_SECONDS", 5.0, minimum=0.0, maximum=3600.0)

# One format for every line, uvicorn's included: see orchestration_site/logging_config.py
LOGGING = service_logging(log_format=env_str("LOG_FORMAT"), level=env_str("LOG_LEVEL"))
