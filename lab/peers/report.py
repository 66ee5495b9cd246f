"""The benchmark's comparison table: our orchestrator, its peers and the raw chain side by side,
with the CPU per saga of every process so a reader sees where each millisecond goes."""
from __future__ import annotations

from dataclasses import dataclass, field

SUBGROUP = "  "  # a row starting so is part of the row above, not added to the total


@dataclass(frozen=True)
class Column:
    name: str
    rate: float | None  # completed sagas (chains) per second, C in flight
    p50_c: float | None  # ms, C in flight
    p99_c: float | None
    p50_1: float | None  # ms, one in flight
    p99_1: float | None
    cpu_ms: dict[str, float] = field(default_factory=dict)  # process group -> ms of CPU per saga
    note: str = ""

    @property
    def cpu_total(self) -> float | None:
        parts = [value for name, value in self.cpu_ms.items() if not name.startswith(SUBGROUP)]
        return round(sum(parts), 2) if parts else None


def number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def pair(first: float | None, second: float | None) -> str:
    return f"{number(first)} / {number(second)}"


def comparison_rows(columns: list[Column], concurrency: int) -> list[tuple[str, ...]]:
    rows = [(f"sagas/s, {concurrency} in flight", *(number(c.rate) for c in columns)),
            (f"p50 / p99 ms, {concurrency} in flight", *(pair(c.p50_c, c.p99_c) for c in columns)),
            ("p50 / p99 ms, 1 in flight", *(pair(c.p50_1, c.p99_1) for c in columns)),
            ("CPU ms per saga, all processes below", *(number(c.cpu_total, 2) for c in columns))]
    groups: list[str] = []
    for column in columns:
        groups += [name for name in column.cpu_ms if name not in groups]
    # the servers last, in a fixed order, so the service's own processes lead
    servers = [name for name in groups if _is_server(name)]
    for name in [*[g for g in groups if not _is_server(g)], *servers]:
        rows.append((f"  {name}" if not name.startswith(SUBGROUP) else f"    {name.strip()}",
                     *(number(c.cpu_ms.get(name), 2) if name in c.cpu_ms else "" for c in columns)))
    return rows


def _is_server(name: str) -> bool:
    return name.startswith(("PostgreSQL", "Redis", "RabbitMQ", SUBGROUP))


def render(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A plain text table: columns padded to their widest cell, a rule under the header."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip(),
             "-+-".join("-" * width for width in widths)]
    lines += [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def comparison_table(columns: list[Column], concurrency: int) -> str:
    notes = [f"{c.name}: {c.note}" for c in columns if c.note]
    table = render(("", *(c.name for c in columns)), comparison_rows(columns, concurrency))
    return table + ("\n" + "\n".join(notes) if notes else "")
