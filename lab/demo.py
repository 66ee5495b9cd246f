"""`make run`: the service and a demo of its neighbours, so a newcomer sees sagas run end to end.

First a preflight: the configuration is read (a bad value is one line, `configuration error: ...`)
and RabbitMQ, Redis and the database must answer; for each one that does not, it says how to
start it, and nothing is started. Then it migrates the database (SQLite by default), creates a
demo staff account for the admin, and runs the web process on PORT (7001), one saga consumer, and
the demo participants and auth service, until Ctrl-C. Debug mode: never run this as production.
"""
import os
import signal
import sys
import time
from pathlib import Path

from lab.stack import DEMO_SETTINGS, ROOT, Stack
from orchestration_site.env import ConfigError, env_int

TRY_IT = """
  The order saga is running:
    web + API        http://localhost:{port}/            (OpenAPI docs: http://localhost:{port}/api/docs/)
    support console  http://localhost:{port}/admin/      user {user}  password {password}
    logs             {logs}/

  Start a saga that completes, then one that is compensated (declined card):
    curl -si -X POST http://localhost:{port}/orders/create_order -H 'Authorization: Bearer demo-alice' \\
         -H 'Content-Type: application/json' -d '{{"items": [{{"product_id": "sku-1", "quantity": 2}}]}}'
    curl -si -X POST http://localhost:{port}/orders/create_order -H 'Authorization: Bearer demo-alice' \\
         -H 'Content-Type: application/json' \\
         -d '{{"items": [{{"product_id": "sku-2", "quantity": 1}}], "payment_method": "pm-declined"}}'
  Then follow it:  curl -s http://localhost:{port}/sagas/<saga_id> -H 'Authorization: Bearer demo-alice'
  Demo tokens: demo-alice, demo-bob, demo-staff (staff). Products: sku-1, sku-2, sku-3, sku-sold-out (no stock),
  sku-unorderable (the Order service refuses it), sku-slow; payment method pm-declined is always declined.

  Ctrl-C stops everything.
"""


def _postgres_version() -> str:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    return versions[-1] if versions else "<version>"


# how to start each dependency on this kind of machine (Debian, no systemd), or in Docker
HOW_TO_START = {
    "RabbitMQ": ("rabbitmq-server -detached",
                 "docker run -d --name orchestrator-rabbitmq -p 127.0.0.1:5672:5672 rabbitmq:3.13-management"),
    "Redis": ("redis-server --daemonize yes --bind 127.0.0.1 --port 6379",
              "docker run -d --name orchestrator-redis -p 127.0.0.1:6379:6379 redis:7"),
    "PostgreSQL": (f"pg_ctlcluster {_postgres_version()} main start",
                   "docker run -d --name orchestrator-postgres -p 127.0.0.1:5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust "
                   "postgres:16   (or leave DATABASE_URL unset: the demo then uses SQLite)"),
}


def _check_rabbitmq(settings) -> str | None:
    from sagas.broker import Broker, BrokerUnavailable

    broker = Broker()
    try:
        broker.connect()
    except BrokerUnavailable as error:
        return str(error)
    finally:
        broker.close()
    return None


def _check_redis(settings) -> str | None:
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as error:
        return str(error)
    finally:
        client.close()
    return None


def _check_database(settings) -> str | None:
    database = settings.DATABASES["default"]
    if database["ENGINE"] != "django.db.backends.postgresql":
        return None  # SQLite: a file, nothing to start
    import psycopg

    try:
        psycopg.connect(dbname=database["NAME"], user=database["USER"], password=database["PASSWORD"] or None,
                        host=database["HOST"], port=database["PORT"] or 5432, connect_timeout=3).close()
    except psycopg.Error as error:
        return str(error).strip().splitlines()[0]
    return None


def preflight(settings) -> list[str]:
    """What to tell the person, one paragraph per dependency that does not answer (none: all answer)."""
    database = settings.DATABASES["default"]
    checks = [
        ("RabbitMQ", f"{settings.RABBITMQ['host']}:{settings.RABBITMQ['port']}", "RABBITMQ_HOST/RABBITMQ_PORT",
         _check_rabbitmq),
        ("Redis", f"{settings.REDIS_HOST}:{settings.REDIS_PORT}", "REDIS_HOST/REDIS_PORT", _check_redis),
        ("PostgreSQL", f"{database.get('HOST')}:{database.get('PORT') or 5432}", "DATABASE_URL", _check_database),
    ]
    problems = []
    for name, address, variables, check in checks:
        error = check(settings)
        if error is not None:
            local, docker = HOW_TO_START[name]
            problems.append(f"make run: {name} does not answer at {address} ({error}).\n"
                            f"  start it:      {local}\n  or in Docker:  {docker}\n"
                            f"  or point {variables} at a running one.")
    return problems


def configure(*, log_dir: Path) -> tuple[Stack, object]:
    """The stack's environment and the settings it gives; raises ConfigError for a bad value."""
    stack = Stack.create(log_dir=log_dir, web_port=env_int("PORT", default=7001, minimum=1, maximum=65535),
                         settings=DEMO_SETTINGS)
    os.environ.update(stack.env)  # the settings read here are the ones the processes will read
    import django
    from django.conf import settings

    django.setup()
    return stack, settings


def main() -> None:
    try:
        stack, settings = configure(log_dir=ROOT / "var" / "log")
    except ConfigError as error:
        sys.exit(f"configuration error: {error}")
    problems = preflight(settings)
    if problems:
        sys.exit("\n".join(problems))
    stack.manage("migrate", "--no-input")
    account = stack.manage("create_demo_staff").stdout.split()
    stack.start_participants()
    stack.start_consumer()
    stack.start_web()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        stack.wait_auth()
        stack.wait_web()
        print(TRY_IT.format(port=stack.web_port, user=account[0], password=account[1], logs=stack.log_dir), flush=True)
        while not stop:
            for service in stack.services.values():
                if not service.alive():
                    sys.exit(f"{service.name} stopped; see {service.log_path}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping...", flush=True)
        stack.stop_all()


if __name__ == "__main__":
    main()
