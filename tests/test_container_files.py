"""The Dockerfile and docker-compose.yml, checked statically (there is no Docker daemon, nor the
compose plugin, on the test machine): no secret is persisted in the image, and nothing is
published on every interface of the host."""
import re
import shlex

import pytest
import yaml

from tools.stack import ROOT, Stack, free_port

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
