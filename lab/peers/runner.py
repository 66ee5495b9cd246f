"""Running the peers from the benchmark: their sandbox settings, worker, driver and CPU watch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lab.peers.cpu import CpuWatch, Group, per_saga_ms, server_groups
from lab.peers.driver import PeerProcess
from lab.sandbox import Sandbox
from lab.stack import ROOT

PEERS = ("celery-saga", "dbos")
PASSES = ("warmup", "compensation", "throughput", "single")


def peer_environment(sandbox: Sandbox, *, rabbitmq_host: str, ledger_dir: Path) -> dict[str, str]:
    vhost = "" if sandbox.vhost == "/" else sandbox.vhost
    return {"PEER_BROKER_URL": f"amqp://{sandbox.rabbitmq_user}:guest@{rabbitmq_host}:5672/{vhost}",
            "PEER_REDIS_URL": f"redis://{sandbox.redis_host}:{sandbox.redis_port}/{sandbox.redis_db}",
            "PEER_DBOS_URL": sandbox.database_url.replace("postgres://", "postgresql://", 1),
            "PEER_LEDGER_DIR": str(ledger_dir)}


def run_peer(name: str, *, env: dict, log_dir: Path, sagas: int, concurrency: int, single: int, warmup: int,
             log_level: str, timeout: float, databases: list[str]) -> dict:
    """One peer's four passes; CPU per process measured over the throughput pass only."""
    module = {"celery-saga": "lab.peers.celery_saga_peer", "dbos": "lab.peers.dbos_peer"}[name]
    env = {**env, "PEER_LEDGER": str(Path(env["PEER_LEDGER_DIR"]) / f"{name}_ledger.sqlite3")}
    worker = None
    if name == "celery-saga":
        worker_log = open(log_dir / "celery-worker.log", "ab")
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", module, "worker", "--concurrency", "2",
                                   "--prefetch-multiplier", "25", "--loglevel", log_level], cwd=ROOT, env=env,
                                  stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
        worker_log.close()
    argv = [sys.executable, "-m", module, "--sagas", str(sagas), "--concurrency", str(concurrency),
            "--single", str(single), "--warmup", str(warmup)]
    if name == "dbos":
        argv += ["--log-level", log_level]
    driver = PeerProcess(argv, cwd=ROOT, env=env, log_path=log_dir / f"{name}-driver.log")
    groups = [Group("celery worker (main + 2 pool processes)", roots=(worker.pid,))] if worker else [
        Group("DBOS process (workflows, steps, clients)", roots=(driver.pid,))]
    if worker:
        groups.append(Group("load generator", roots=(driver.pid,)))
    watch = CpuWatch([*groups, *server_groups(databases)])
    results: dict = {"processes": [group.name for group in groups]}
    try:
        for pass_name in PASSES:
            if pass_name == "throughput":
                results[pass_name] = driver.run(pass_name, timeout=timeout, before=watch.start,
                                                after=lambda: results.update(cpu_seconds=watch.stop()))
            else:
                results[pass_name] = driver.run(pass_name, timeout=timeout)
    finally:
        driver.stop()
        if worker:
            stop_process(worker)
    results["cpu_ms_per_saga"] = per_saga_ms(results["cpu_seconds"], results["throughput"]["completed"])
    return results


def stop_process(process: subprocess.Popen, *, timeout: float = 20.0) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
