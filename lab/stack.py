"""Start the service's processes (web, consumers, demo participants and auth) as real
subprocesses, and stop, kill or restart them. Used by the demo (`make run`), the benchmark and
the fault suite, so all three run the service exactly as production does.

The web process and the consumers run the stack's settings (production's unless told: the
benchmark and the fault suite measure production; `make run` passes the demo's); the demo
participants and auth service always run the demo settings, the only ones that install them."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from orchestration_site.logging_config import UVICORN_LOG_CONFIG

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PRODUCTION_SETTINGS = "orchestration_site.settings"
DEMO_SETTINGS = "orchestration_site.settings_demo"


@dataclass
class Service:
    name: str
    argv: list[str]
    log_path: Path
    env: dict
    process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Stack:
    env: dict
    log_dir: Path
    web_port: int = 7001
    auth_port: int = 5206
    ledger: Path | None = None
    services: dict[str, Service] = field(default_factory=dict)

    @classmethod
    def create(cls, *, log_dir: Path, web_port: int = 7001, auth_port: int = 5206, ledger: Path | None = None,
               settings: str = PRODUCTION_SETTINGS, **env_overrides: str) -> "Stack":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DJANGO_SETTINGS_MODULE": settings,
               "PORT": str(web_port), "AUTHERIZATION_SERVER_HOST": "http://127.0.0.1",
               "AUTHERIZATION_SERVER_PORT": str(auth_port)}
        env.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))
        env.update({key: str(value) for key, value in env_overrides.items()})
        log_dir.mkdir(parents=True, exist_ok=True)
        return cls(env=env, log_dir=log_dir, web_port=web_port, auth_port=auth_port, ledger=ledger)

    def manage(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "manage.py", *args], cwd=ROOT, env=self.env, check=check,
                              capture_output=True, text=True)

    def _start(self, name: str, argv: list[str], *, settings: str | None = None) -> Service:
        env = self.env if settings is None else {**self.env, "DJANGO_SETTINGS_MODULE": settings}
        service = self.services.get(name) or Service(name, argv, self.log_dir / f"{name}.log", env)
        log = open(service.log_path, "ab")
        service.process = subprocess.Popen(argv, cwd=ROOT, env=service.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        log.close()
        self.services[name] = service
        return service

    def start_web(self, *, access_log: bool = True) -> Service:
        argv = [PYTHON, "-m", "uvicorn", "orchestration_site.asgi:application", "--host", "127.0.0.1",
                "--port", str(self.web_port), "--lifespan", "off", "--log-config", UVICORN_LOG_CONFIG]
        return self._start("web", argv if access_log else [*argv, "--no-access-log"])

    def start_consumer(self, number: int = 1) -> Service:
        return self._start(f"consumer-{number}", [PYTHON, "manage.py", "run_saga_consumer"])

    def start_participants(self, *, reset: bool = True, with_shipping: bool = False) -> Service:
        argv = [PYTHON, "manage.py", "run_demo_participants", "--auth-port", str(self.auth_port)]
        if self.ledger:
            argv += ["--ledger", str(self.ledger)]
        if with_shipping:
            argv.append("--with-shipping")
        return self._start("participants", [*argv, "--reset"] if reset else argv, settings=DEMO_SETTINGS)

    def restart(self, name: str) -> Service:
        self.stop(name)
        service = self.services[name]
        return self._start(name, service.argv, settings=service.env["DJANGO_SETTINGS_MODULE"])

    def signal(self, name: str, signum: int) -> None:
        service = self.services[name]
        if service.alive():
            os.killpg(service.process.pid, signum)

    def stop(self, name: str, *, timeout: float = 15.0) -> None:
        service = self.services[name]
        if not service.alive():
            return
        self.signal(name, signal.SIGTERM)
        try:
            service.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(name, signal.SIGKILL)
            service.process.wait()

    def kill(self, name: str) -> None:
        self.signal(name, signal.SIGKILL)
        self.services[name].process.wait()

    def stop_all(self) -> None:
        for name in list(self.services):
            self.stop(name)

    def wait_web(self, timeout: float = 30.0) -> None:
        wait_http(f"http://127.0.0.1:{self.web_port}/", timeout=timeout, what="the web process")

    def wait_auth(self, timeout: float = 30.0) -> None:
        wait_http(f"http://127.0.0.1:{self.auth_port}/auth/verify", timeout=timeout, what="the demo auth service",
                  accept=(401,))


def free_port() -> int:
    """A TCP port nothing listens on now, for a process the caller is about to start."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_http(url: str, *, timeout: float, what: str, accept: tuple[int, ...] = ()) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:
            if error.code in accept:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout}s")
