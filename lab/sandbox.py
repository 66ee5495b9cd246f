"""One sandbox for the lab's runs: a PostgreSQL database, a RabbitMQ vhost and a Redis db that
only this run uses, so the benchmark and the fault suite disturb nobody's data.

    sandbox = Sandbox(database="bench_orchestrator", vhost="bench", redis_db=6)
    sandbox.create()                       # fresh: whatever an earlier run left is removed first
    stack = Stack.create(..., **sandbox.environment())
    sandbox.destroy()

Vhost "/" is the broker's default one: used as it is, never deleted (for a broker without
rabbitmqctl at hand, e.g. a remote one).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from urllib.parse import urlsplit

import psycopg
import redis

log = logging.getLogger(__name__)

POSTGRES_ADMIN_URL = os.environ.get("FAULTS_POSTGRES_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
RABBITMQ_USER = "guest"
DEFAULT_VHOST = "/"


class SandboxError(RuntimeError):
    """A part of the sandbox could not be made; the message says which and why."""


def rabbitmqctl(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    if not shutil.which("rabbitmqctl"):
        raise SandboxError("rabbitmqctl not found: a vhost of its own needs it (or use vhost '/')")
    result = subprocess.run(["rabbitmqctl", "-q", *argv], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise SandboxError(f"rabbitmqctl {' '.join(argv)} failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()[:300]}")
    return result


def redis_client(db: int, *, host: str = REDIS_HOST, port: int = REDIS_PORT) -> redis.Redis:
    return redis.Redis(host=host, port=port, db=db, socket_timeout=5, socket_connect_timeout=5)


@dataclass(frozen=True)
class Sandbox:
    database: str
    vhost: str
    redis_db: int
    postgres_admin_url: str = POSTGRES_ADMIN_URL
    redis_host: str = REDIS_HOST
    redis_port: int = REDIS_PORT
    rabbitmq_user: str = RABBITMQ_USER

    @classmethod
    def named(cls, name: str, *, redis_db: int, **options) -> "Sandbox":
        """A database and a vhost of the same name (the fault runs: one name per run)."""
        return cls(database=name, vhost=name, redis_db=redis_db, **options)

    @property
    def database_url(self) -> str:
        return urlsplit(self.postgres_admin_url)._replace(path=f"/{self.database}").geturl()

    def environment(self) -> dict[str, str]:
        """The service's settings for this sandbox, for Stack.create."""
        return {"DATABASE_URL": self.database_url, "REDIS_HOST": self.redis_host, "REDIS_PORT": str(self.redis_port),
                "REDIS_DB": str(self.redis_db), "RABBITMQ_VHOST": self.vhost}

    def create(self) -> None:
        """An empty database, vhost and Redis db; what an earlier run left in them is removed first."""
        if not self.database or '"' in self.database:
            raise SandboxError(f"database name {self.database!r}: not empty, no double quote")
        with psycopg.connect(self.postgres_admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{self.database}"')
        if self.vhost != DEFAULT_VHOST:
            rabbitmqctl("delete_vhost", self.vhost, check=False)  # absent the first time
            rabbitmqctl("add_vhost", self.vhost)
            rabbitmqctl("set_permissions", "-p", self.vhost, self.rabbitmq_user, ".*", ".*", ".*")
        self.flush_redis()

    def flush_redis(self) -> None:
        """Empty this sandbox's Redis db (only this one: other dbs belong to other people)."""
        redis_client(self.redis_db, host=self.redis_host, port=self.redis_port).flushdb()

    def destroy(self) -> None:
        """Remove everything the run created. Best effort: each part is tried."""
        try:
            with psycopg.connect(self.postgres_admin_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        except psycopg.Error as error:
            log.warning("database %s not dropped: %r", self.database, error)
        if self.vhost != DEFAULT_VHOST:
            try:
                rabbitmqctl("delete_vhost", self.vhost, check=False)
            except SandboxError as error:
                log.warning("vhost %s not deleted: %s", self.vhost, error)
        try:
            self.flush_redis()
        except redis.RedisError as error:
            log.warning("redis db %s not flushed: %r", self.redis_db, error)
