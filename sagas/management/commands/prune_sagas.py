"""Delete finished sagas older than a retention, in batches; a dry run unless --execute.

    python manage.py prune_sagas --finished-before 30d             # what would go
    python manage.py prune_sagas --finished-before 30d --execute   # delete it
"""
import argparse
import re
from datetime import timedelta

from django.core.management.base import BaseCommand
from django.utils import timezone

from sagas import retention

UNITS = {"d": "days", "h": "hours", "m": "minutes"}
AGE = re.compile(r"([1-9][0-9]{0,6})([dhm])")


def age(text: str) -> timedelta:
    """`30d`, `12h`, `90m`: a positive whole number of days, hours or minutes."""
    match = AGE.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age like 30d, 12h or 90m")
    number, unit = match.groups()
    return timedelta(**{UNITS[unit]: int(number)})


def batch_size(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 1 to 10000")
    return int(text)


class Command(BaseCommand):
    help = ("Delete completed and compensated sagas (failed ones too with --include-failed) whose last change is "
            "older than --finished-before, with their timeline and sent outbox messages. A saga with an "
            "unsent outbox message is kept. Dry run unless --execute (or --yes).")

    def add_arguments(self, parser):
        parser.add_argument("--finished-before", type=age, required=True, metavar="AGE",
                            help="age of the saga's last change: 30d, 12h or 90m")
        parser.add_argument("--execute", "--yes", action="store_true", dest="execute", help="delete (default: dry run)")
        parser.add_argument("--include-failed", action="store_true",
                            help="delete failed sagas too (they wait for staff; kept by default)")
        parser.add_argument("--batch-size", type=batch_size, default=500, help="sagas per transaction (default 500)")

    def handle(self, *args, finished_before: timedelta, execute: bool, include_failed: bool, batch_size: int, **options):
        cutoff = timezone.now() - finished_before
        statuses = ", ".join(retention.prunable_statuses(include_failed=include_failed))
        scope = f"{statuses} sagas last changed before {cutoff:%Y-%m-%d %H:%M:%S} UTC"
        if not execute:
            found = retention.count_prunable(finished_before=cutoff, include_failed=include_failed)
            self.stdout.write(f"dry run: would delete {_counts(found)}; {scope}.")
            if not include_failed:
                self.stdout.write("failed sagas are kept (they wait for staff); --include-failed deletes them too.")
            self.stdout.write("nothing deleted: run again with --execute to delete.")
            return

        def progress(batch, total):
            self.stdout.write(f"deleted {_counts(batch)}; {total.sagas} sagas so far")

        total = retention.prune_finished_sagas(finished_before=cutoff, include_failed=include_failed,
                                               batch_size=batch_size, on_batch=progress)
        self.stdout.write(self.style.SUCCESS(f"done: deleted {_counts(total)}; {scope}."))


def _counts(pruned: retention.Pruned) -> str:
    return (f"{pruned.sagas} sagas ({pruned.timeline_entries} timeline entries, "
            f"{pruned.outbox_messages} sent outbox messages)")
