"""CPU per saga of every process that takes part, from /proc (utime + stime), no psutil.

A snapshot maps each pid to its process; a group is a set of pids found in a snapshot: a process
the benchmark started with all its descendants (Celery's pool children), or a server's processes
by name (every postgres process, with the backends serving the run's databases as a subgroup;
redis-server; beam.smp and its helpers). A process that ends during a pass takes its CPU with it
(its parent's cutime gets it), so short-lived processes are under-counted; the service's and the
peers' connections are long-lived. The servers are shared by the whole machine: their CPU
includes whatever else used them during the pass.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RABBITMQ_NAMES = ("beam.smp", "erl_child_setup", "inet_gethost", "epmd")


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    name: str  # the kernel's comm (15 characters at most)
    title: str  # the command line, as the process shows it (postgres puts its database there)
    ticks: int  # utime + stime, in clock ticks


Snapshot = Mapping[int, Process]


def parse_stat(stat: str, title: str = "") -> Process:
    """One /proc/<pid>/stat line. The name is between the first "(" and the last ")": it may hold both."""
    head, _, rest = stat.rpartition(")")
    pid_text, _, name = head.partition(" (")
    fields = rest.split()
    return Process(int(pid_text), int(fields[1]), name, title, int(fields[11]) + int(fields[12]))


def snapshot(proc: Path = Path("/proc")) -> dict[int, Process]:
    found = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        process = parse_stat(stat, title)
        found[process.pid] = process
    return found


def with_descendants(processes: Snapshot, roots: Iterable[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for process in processes.values():
        children.setdefault(process.ppid, []).append(process.pid)
    found, todo = set(), [root for root in roots if root in processes]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def named(processes: Snapshot, names: Iterable[str]) -> set[int]:
    wanted = set(names)
    return {pid for pid, process in processes.items() if process.name in wanted}


def postgres_backends(processes: Snapshot, databases: Iterable[str]) -> set[int]:
    """Backends whose title names one of the databases ("postgres: 15/main: user db host(port) state")."""
    wanted = set(databases)
    return {pid for pid in named(processes, ["postgres"])
            if wanted & set(processes[pid].title.split())}


@dataclass(frozen=True)
class Group:
    """How to find a group's pids in a snapshot: started processes (with descendants) or by name."""

    name: str
    roots: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    databases: tuple[str, ...] = ()
    descendants: bool = True  # False for the benchmark itself: its children are the measured processes

    def pids(self, processes: Snapshot) -> set[int]:
        if self.databases:
            return postgres_backends(processes, self.databases)
        roots = with_descendants(processes, self.roots) if self.descendants else set(self.roots) & set(processes)
        return roots | named(processes, self.names)


def server_groups(databases: Iterable[str]) -> list[Group]:
    return [Group("PostgreSQL (all)", names=("postgres",)),
            Group("  of which this run's backends", databases=tuple(databases)),
            Group("Redis", names=("redis-server",)), Group("RabbitMQ", names=RABBITMQ_NAMES)]


def cpu_seconds(before: Snapshot, after: Snapshot, pids: Iterable[int]) -> float:
    """CPU used between the snapshots by these pids; a pid born in between counts from zero."""
    ticks = 0
    for pid in pids:
        if pid in after:
            ticks += after[pid].ticks - (before[pid].ticks if pid in before and before[pid].name == after[pid].name
                                         else 0)
    return ticks / CLOCK_TICKS


class CpuWatch:
    """CPU seconds of each group over one pass: snapshot at start(), again at stop()."""

    def __init__(self, groups: list[Group]):
        self.groups = groups
        self.before: dict[int, Process] = {}

    def start(self) -> None:
        self.before = snapshot()

    def stop(self) -> dict[str, float]:
        after = snapshot()
        return {group.name: round(cpu_seconds(self.before, after, group.pids(self.before) | group.pids(after)), 3)
                for group in self.groups}


def per_saga_ms(cpu: Mapping[str, float], sagas: int) -> dict[str, float]:
    return {name: round(seconds * 1000 / sagas, 2) for name, seconds in cpu.items()} if sagas else {}
