"""`--profile`: py-spy samples a running process from outside (as root: it reads the process's
memory with ptrace), writes a speedscope file, and the benchmark reduces it to the hottest
functions by own time (the function was running) and by total time (it was on the stack).

py-spy runs --nonblocking (it never pauses the process) at 100 samples/s and keeps only the
samples of the thread holding the GIL (--gil): a thread waiting on a socket (psycopg's wait, a
pika poll, a queue) is not counted, which py-spy's idle detection alone did not manage here. So
the percentages are of the process's Python CPU time.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PY_SPY = Path(sys.executable).parent / "py-spy"
REPOSITORY = str(Path(__file__).resolve().parents[2])
TOP = 25


class Profile:
    """py-spy recording one process until stop()."""

    def __init__(self, *, pid: int, name: str, out_dir: Path, rate: int = 100):
        self.name = name
        self.path = out_dir / f"profile-{name}.speedscope.json"
        self.log = out_dir / f"profile-{name}.py-spy.log"
        argv = [str(PY_SPY), "record", "--pid", str(pid), "--format", "speedscope", "--output", str(self.path),
                "--rate", str(rate), "--nonblocking", "--gil"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, *, timeout: float = 30.0) -> Path | None:
        """Ends the recording (py-spy writes its file on SIGINT); the file, or None when there is none."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.path if self.path.exists() else None


@dataclass(frozen=True)
class Hot:
    function: str  # "name (file)"
    own_pct: float
    total_pct: float


def hottest(speedscope: dict) -> list[Hot]:
    """Every function's share of the samples, as the running one (own) and anywhere on the stack
    (total; once per sample however deep it recurses). A function is its name and file: py-spy's
    frames also carry the line being run, which would split a function into many rows."""
    frames = [f"{frame['name']} ({short_path(frame.get('file') or '?')})" for frame in speedscope["shared"]["frames"]]
    own: dict[str, float] = {}
    total: dict[str, float] = {}
    weight_sum = 0.0
    for profile in speedscope["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"]):
            weight_sum += weight
            if not stack:
                continue
            own[frames[stack[-1]]] = own.get(frames[stack[-1]], 0.0) + weight
            for function in {frames[index] for index in stack}:
                total[function] = total.get(function, 0.0) + weight
    if not weight_sum:
        return []
    return [Hot(function, round(100 * own.get(function, 0.0) / weight_sum, 1), round(100 * spent / weight_sum, 1))
            for function, spent in total.items()]


def short_path(path: str) -> str:
    """A module's path from its package root: site-packages/, the standard library or the repository."""
    for marker in ("/site-packages/", "/lib/python3."):
        _, found, tail = path.rpartition(marker)
        if found:
            return tail.split("/", 1)[1] if marker == "/lib/python3." and "/" in tail else tail
    return path.removeprefix(f"{REPOSITORY}/")


def top_text(name: str, rows: list[Hot], *, top: int = TOP, samples_note: str = "") -> str:
    """The two top-`top` lists of one profile as plain text (the file the benchmark writes)."""
    lines = [f"# {name}: {samples_note}".rstrip(": ")]
    for title, key in (("own time", lambda hot: hot.own_pct), ("total time", lambda hot: hot.total_pct)):
        lines += ["", f"## the {top} hottest functions by {title} (% of busy samples: own / total)"]
        ranked = sorted(rows, key=lambda hot: (-key(hot), hot.function))[:top]
        lines += [f"{hot.own_pct:5.1f} {hot.total_pct:5.1f}  {hot.function}" for hot in ranked]
    return "\n".join(lines) + "\n"


def summarize(path: Path, name: str, out_dir: Path) -> Path:
    speedscope = json.loads(path.read_text())
    samples = sum(len(profile["samples"]) for profile in speedscope["profiles"])
    text = top_text(name, hottest(speedscope), samples_note=f"{samples} busy samples over "
                                                             f"{len(speedscope['profiles'])} threads")
    out = out_dir / f"profile-{name}.top.txt"
    out.write_text(text)
    return out
