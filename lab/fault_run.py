"""The long fault run, and throughput without faults.

    python -m lab.fault_run --sagas 2000 --faults 20 --consumers 2 --seed 7
    python -m lab.fault_run --sagas 1000 --faults 0 --consumers 1,2,4     # throughput per consumer count

Kills and restarts real processes and restarts the machine's RabbitMQ and PostgreSQL (briefly:
other people's runs notice). Uses a database, Redis db and RabbitMQ vhost of its own, removed at
the end (--keep leaves them). Exit status 0 when every check passed.
"""
import argparse
import logging
import sys
from pathlib import Path

from lab.faults.runner import ScenarioConfig, run_scenario
from lab.faults.schedule import FAULT_KINDS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ScenarioConfig()  # every default comes from ScenarioConfig (redis_db reads FAULTS_REDIS_DB)
    parser.add_argument("--sagas", type=int, default=defaults.sagas, help="orders to send (default %(default)s)")
    parser.add_argument("--faults", type=int, default=defaults.faults,
                        help="faults to inject (default %(default)s; 0: a throughput run)")
    parser.add_argument("--consumers", default=str(defaults.consumers),
                        help="consumer processes; a list (1,2,4) runs once per count")
    parser.add_argument("--seed", type=int, help="schedule and order mix seed (default: random, printed)")
    parser.add_argument("--duration", type=float,
                        help="seconds to spread orders and faults over (default 8 per fault; 0 = as fast as possible)")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency,
                        help="client requests in flight (default %(default)s)")
    parser.add_argument("--poison", type=int, help="poison replies to inject (default 12, 0 without faults)")
    parser.add_argument("--kinds", default=",".join(defaults.fault_kinds),
                        help=f"fault kinds to draw from (default all: {','.join(FAULT_KINDS)})")
    parser.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout)
    parser.add_argument("--step-timeout", type=float, default=defaults.step_timeout,
                        help="SAGA_STEP_TIMEOUT_SECONDS (default %(default)s)")
    parser.add_argument("--step-max-attempts", type=int, default=defaults.step_max_attempts)
    parser.add_argument("--compensation-max-attempts", type=int, default=defaults.compensation_max_attempts)
    parser.add_argument("--redis-db", type=int, default=defaults.redis_db,
                        help="Redis db number of its own (default %(default)s, from FAULTS_REDIS_DB if set)")
    parser.add_argument("--log-level", default=defaults.log_level, help="the service's LOG_LEVEL (default %(default)s)")
    parser.add_argument("--log-dir", type=Path, help="default var/faults/<run id>")
    parser.add_argument("--keep", action="store_true", help="keep the database and vhost afterwards")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")

    counts = [int(n) for n in args.consumers.split(",")]
    results = []
    for consumers in counts:
        config = ScenarioConfig(
            sagas=args.sagas, faults=args.faults, consumers=consumers, seed=args.seed, duration=args.duration,
            concurrency=args.concurrency, poison=args.poison, drain_timeout=args.drain_timeout,
            step_timeout=args.step_timeout, step_max_attempts=args.step_max_attempts,
            compensation_max_attempts=args.compensation_max_attempts, redis_db=args.redis_db,
            fault_kinds=tuple(args.kinds.split(",")), log_level=args.log_level,
            log_dir=args.log_dir / f"consumers-{consumers}" if args.log_dir and len(counts) > 1 else args.log_dir,
            keep=args.keep,
        )
        result = run_scenario(config, out=lambda line: print(line, flush=True))
        print(result.summary(), flush=True)
        results.append((consumers, result))
    if len(results) > 1:
        print("\nconsumers  accepted/s  finished/s  completed/s  p50 s  p95 s  checks")
        for consumers, result in results:
            t = result.throughput
            print(f"{consumers:>9}  {t['accepted_per_s']:>10.1f}  {t['finished_per_s']:>10.1f}  {t['completed_per_s']:>11.1f}"
                  f"  {t['latency_p50']:>5.2f}  {t['latency_p95']:>5.2f}  {'ok' if result.ok else 'FAILED'}")
    return 0 if all(result.ok for _, result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
