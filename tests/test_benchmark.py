"""The benchmark's pure parts: percentiles, per-process CPU accounting, profile reduction and the
tables. No timing is asserted anywhere: the figures themselves belong to `make bench`."""
import io
import sys

from hypothesis import given
from hypothesis import strategies as st

from lab.benchmark import percentile
from lab.peers import driver
from lab.peers.cpu import CLOCK_TICKS, Group, Process, cpu_seconds, parse_stat, postgres_backends, with_descendants
from lab.peers.profiling import hottest, short_path, top_text
from lab.peers.report import Column, comparison_rows, render

# --- percentiles ---------------------------------------------------------------------------------------


def test_percentile_is_nearest_rank():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [percentile(values, p) for p in (1, 20, 21, 50, 99, 100)] == [1.0, 1.0, 2.0, 3.0, 5.0, 5.0]
    assert percentile([], 50) is None


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1),
       st.floats(min_value=0.001, max_value=100), st.floats(min_value=0.001, max_value=100))
def test_percentile_is_a_sample_and_never_decreases_with_the_rank(values, a, b):
    low, high = sorted((a, b))
    assert percentile(values, low) in values
    assert percentile(values, low) <= percentile(values, high)


# --- CPU accounting -------------------------------------------------------------------------------------


def stat_line(pid, name, ppid, utime, stime):
    return f"{pid} ({name}) S {ppid} 1 1 0 -1 4194560 100 0 0 0 {utime} {stime} 0 0 20 0 1 0 5 0 0"


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\n"), max_size=15),
       st.integers(1, 4_000_000), st.integers(0, 4_000_000), st.integers(0, 10**9), st.integers(0, 10**9))
def test_a_stat_line_parses_whatever_the_process_calls_itself(name, pid, ppid, utime, stime):
    # a comm may hold spaces and parentheses, ") (" included: only the last ")" ends it
    assert parse_stat(stat_line(pid, name, ppid, utime, stime)) == Process(pid, ppid, name, "", utime + stime)


def snapshot_of(*processes):
    return {p.pid: p for p in processes}


def test_a_started_process_counts_with_its_children_and_the_benchmark_without():
    procs = snapshot_of(Process(1, 0, "init", "", 0), Process(10, 1, "python", "benchmark", 5),
                        Process(11, 10, "celery", "worker", 7), Process(12, 11, "celery", "pool", 9),
                        Process(13, 11, "celery", "pool", 9), Process(20, 1, "python", "other", 50))
    assert with_descendants(procs, [11]) == {11, 12, 13}
    assert Group("worker", roots=(11,)).pids(procs) == {11, 12, 13}
    assert Group("load generator", roots=(10,), descendants=False).pids(procs) == {10}
    assert Group("gone", roots=(99,)).pids(procs) == set()


def test_postgres_backends_are_found_by_the_database_in_their_title():
    procs = snapshot_of(Process(1, 0, "postgres", "/usr/lib/postgresql/15/bin/postgres -D x", 0),
                        Process(2, 1, "postgres", "postgres: 15/main: postgres bench 127.0.0.1(5) idle", 0),
                        Process(3, 1, "postgres", "postgres: 15/main: postgres bench_peers 127.0.0.1(6) idle", 0),
                        Process(4, 1, "postgres", "postgres: 15/main: walwriter", 0))
    assert postgres_backends(procs, ["bench"]) == {2}
    assert postgres_backends(procs, ["bench", "bench_peers"]) == {2, 3}
    assert Group("PostgreSQL (all)", names=("postgres",)).pids(procs) == {1, 2, 3, 4}


def test_cpu_between_snapshots_counts_newcomers_from_zero_and_not_a_reused_pid_twice():
    before = snapshot_of(Process(1, 0, "web", "", 100), Process(2, 0, "old", "", 500))
    after = snapshot_of(Process(1, 0, "web", "", 100 + CLOCK_TICKS), Process(2, 0, "new", "", CLOCK_TICKS),
                        Process(3, 0, "backend", "", 2 * CLOCK_TICKS))
    assert cpu_seconds(before, after, [1]) == 1.0
    assert cpu_seconds(before, after, [2]) == 1.0  # pid 2 is another process now: all its CPU is new
    assert cpu_seconds(before, after, [3]) == 2.0
    assert cpu_seconds(before, after, [1, 2, 3, 4]) == 4.0  # 4: in neither snapshot


@given(st.dictionaries(st.integers(1, 50), st.tuples(st.integers(0, 10**6), st.integers(0, 10**6))))
def test_cpu_is_never_negative_while_ticks_only_grow(ticks):
    before = {pid: Process(pid, 0, "p", "", start) for pid, (start, _) in ticks.items()}
    after = {pid: Process(pid, 0, "p", "", start + more) for pid, (start, more) in ticks.items()}
    assert cpu_seconds(before, after, ticks) == sum(more for _, more in ticks.values()) / CLOCK_TICKS >= 0


# --- profiles ---------------------------------------------------------------------------------------------

FRAMES = [{"name": "main", "file": "/x/site-packages/app.py"}, {"name": "handle", "file": "/x/site-packages/app.py"},
          {"name": "recurse", "file": "/repo/sagas/engine.py"}]


def speedscope(*profiles):
    return {"shared": {"frames": FRAMES}, "profiles": [{"samples": samples, "weights": [1] * len(samples)}
                                                       for samples in profiles]}


def test_own_time_is_the_leaf_and_total_time_counts_a_recursive_function_once():
    rows = {hot.function: hot for hot in hottest(speedscope([[0, 1], [0, 2, 2, 2]], [[0], [0, 1]]))}
    assert (rows["main (app.py)"].own_pct, rows["main (app.py)"].total_pct) == (25.0, 100.0)
    assert (rows["handle (app.py)"].own_pct, rows["handle (app.py)"].total_pct) == (50.0, 50.0)
    assert (rows["recurse (/repo/sagas/engine.py)"].own_pct, rows["recurse (/repo/sagas/engine.py)"].total_pct) == (
        25.0, 25.0)


stacks = st.lists(st.lists(st.integers(0, len(FRAMES) - 1), min_size=1, max_size=6), max_size=30)


@given(st.lists(stacks, min_size=1, max_size=3))
def test_no_function_ever_has_more_own_than_total_time_nor_more_than_all_samples(profiles):
    rows = hottest(speedscope(*profiles))
    assert all(0 < hot.own_pct <= hot.total_pct <= 100 or hot.own_pct == 0 for hot in rows)
    assert sum(hot.own_pct for hot in rows) <= 100.5  # each sample has one leaf; rounding adds at most 0.05 a row


def test_the_top_text_ranks_by_own_then_by_total_and_keeps_the_top_n():
    text = top_text("web", hottest(speedscope([[0, 1], [0, 1], [0, 2]])), top=2)
    own, total = text.split("## the 2 hottest functions by total time")
    assert own.strip().splitlines()[-2:] == [" 66.7  66.7  handle (app.py)", " 33.3  33.3  recurse (/repo/sagas/engine.py)"]
    assert total.splitlines()[1:3] == ["  0.0 100.0  main (app.py)", " 66.7  66.7  handle (app.py)"]


def test_a_module_path_is_shown_from_its_package_root():
    assert short_path("/v/.venv/lib/python3.11/site-packages/psycopg/connection.py") == "psycopg/connection.py"
    assert short_path("/root/.pyenv/versions/3.11.7/lib/python3.11/concurrent/futures/thread.py") == (
        "concurrent/futures/thread.py")
    assert short_path("<string>") == "<string>"


# --- tables ----------------------------------------------------------------------------------------------


def test_the_comparison_puts_every_process_in_its_own_row_and_totals_without_the_subgroup():
    ours = Column("orchestrator", 70.0, 180.0, 300.0, 28.8, 40.0,
                  {"web": 6.6, "consumer-1": 5.2, "PostgreSQL (all)": 4.0, "  of which this run's backends": 3.5})
    dbos = Column("dbos", 98.0, 150.0, 200.0, 9.1, 12.0, {"DBOS process (workflows, steps, clients)": 8.0,
                                                           "PostgreSQL (all)": 2.7})
    rows = {row[0]: row[1:] for row in comparison_rows([ours, dbos], 16)}
    assert rows["sagas/s, 16 in flight"] == ("70.0", "98.0")
    assert rows["CPU ms per saga, all processes below"] == ("15.80", "10.70")
    assert rows["  web"] == ("6.60", "")
    assert rows["  DBOS process (workflows, steps, clients)"] == ("", "8.00")
    assert rows["    of which this run's backends"] == ("3.50", "")
    order = list(rows)
    assert order.index("  DBOS process (workflows, steps, clients)") < order.index("  PostgreSQL (all)") < order.index(
        "    of which this run's backends")


def test_a_rendered_table_lines_its_columns_up():
    lines = render(("metric", "value"), [("a", "1"), ("longer metric", "22")]).splitlines()
    assert lines == ["metric        | value", "--------------+------", "a             | 1", "longer metric | 22"]


# --- the driver protocol ---------------------------------------------------------------------------------


def test_a_pass_counts_each_status_and_times_only_the_completed(monkeypatch):
    outcomes = iter(["completed", "compensated", "completed"])
    result = driver.run_pass(driver.PassSpec("t", 3, 1, "pm"), lambda ref, facts: next(outcomes), lambda m: {})
    assert result["statuses"] == {"completed": 2, "compensated": 1}
    assert (result["sagas"], result["completed"], len(result["latencies_ms"])) == (3, 2, 2)


def test_a_saga_that_raises_is_counted_as_an_error_and_the_pass_goes_on():
    def one_saga(reference, facts):
        raise RuntimeError("broker gone")

    result = driver.run_pass(driver.PassSpec("t", 2, 2, "pm"), one_saga, lambda m: {})
    assert result["statuses"] == {"error": 2} and "broker gone" in result["errors"][0]


def test_the_driver_waits_for_the_word_before_each_pass(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(sys, "stdin", io.StringIO("go\n"))  # one word: the second pass never starts
    driver.serve_passes([driver.PassSpec("a", 1, 1, "pm"), driver.PassSpec("b", 1, 1, "pm")],
                        lambda ref, facts: ran.append(facts) or "completed", lambda method: {"method": method})
    lines = capsys.readouterr().out.splitlines()
    assert [line[:20] for line in lines] == ['{"ready": "a"}', '{"result": "a", "sag', '{"ready": "b"}']
    assert ran == [{"method": "pm"}]
