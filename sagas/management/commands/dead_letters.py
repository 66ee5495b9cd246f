"""Dead letters from the command line, as in the console:

    python manage.py dead_letters list [--status open|requeued|discarded|all] [--limit 50]
    python manage.py dead_letters show ID
    python manage.py dead_letters requeue ID --user alice --reason "participant fixed the payload"
    python manage.py dead_letters discard ID --user alice --reason "test message"
    python manage.py dead_letters prune --settled-before 30d [--execute]

requeue and discard act as a Django user who holds the permission (sagas.requeue_deadletter,
sagas.discard_deadletter), and go into the admin history under that user's name.
"""
import json

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from sagas import dead_letters
from sagas.broker import BrokerUnavailable
from sagas.dead_letter_models import DeadLetter
from sagas.management.commands.prune_sagas import age


class Command(BaseCommand):
    help = "List, show, requeue, discard or prune the dead letters filed from saga.replies.dead."

    def add_arguments(self, parser):
        commands = parser.add_subparsers(dest="subcommand", required=True)
        listing = commands.add_parser("list", help="the newest dead letters first")
        listing.add_argument("--status", choices=[*DeadLetter.Status.values, "all"], default="open")
        listing.add_argument("--limit", type=int, default=50)
        commands.add_parser("show", help="one dead letter, body and headers").add_argument("id", type=int)
        for name in ("requeue", "discard"):
            action = commands.add_parser(name, help=f"{name} one dead letter")
            action.add_argument("id", type=int)
            action.add_argument("--user", required=True, help="the Django user acting (needs the permission)")
            action.add_argument("--reason", required=True, help="why; it goes into the admin history")
        prune = commands.add_parser("prune", help="delete settled dead letters; a dry run unless --execute")
        prune.add_argument("--settled-before", type=age, required=True, metavar="AGE")
        prune.add_argument("--execute", action="store_true")

    def handle(self, *args, subcommand: str, **options):
        return getattr(self, f"_{subcommand}")(**options)

    def _list(self, *, status: str, limit: int, **_):
        rows = DeadLetter.objects.all() if status == "all" else DeadLetter.objects.filter(status=status)
        rows = rows.defer("body", "headers")[:max(1, limit)]
        for row in rows:
            self.stdout.write(f"{row.pk}\t{row.dead_lettered_at:%Y-%m-%d %H:%M:%S}\t{row.status}\t"
                              f"{row.saga_id or '-'}\t{row.reason[:100]}")

    def _show(self, *, id: int, **_):
        row = self._row(id)
        body = bytes(row.body)
        self.stdout.write(json.dumps({
            "id": row.pk, "status": row.status, "reason": row.reason, "saga_id": str(row.saga_id) if row.saga_id else None,
            "message_id": row.message_id, "correlation_id": row.correlation_id,
            "dead_lettered_at": row.dead_lettered_at.isoformat(), "filed_at": row.filed_at.isoformat(),
            "settled_by": row.settled_by, "settled_at": row.settled_at.isoformat() if row.settled_at else None,
            "note": row.note, "headers": row.headers,
            "body": body.decode("utf-8", "backslashreplace"), "body_bytes": len(body),
        }, indent=2, ensure_ascii=False))

    def _requeue(self, **options):
        self._settle("requeue", **options)

    def _discard(self, **options):
        self._settle("discard", **options)

    def _settle(self, action: str, *, id: int, user: str, reason: str, **_):
        person = get_user_model().objects.filter(**{get_user_model().USERNAME_FIELD: user}).first()
        if person is None:
            raise CommandError(f"no user {user!r}")
        try:
            row = dead_letters.settle_by(user=person, action=action, dead_letter_id=id, note=reason)
        except DeadLetter.DoesNotExist:
            raise CommandError(f"no dead letter {id}") from None
        except (PermissionDenied, dead_letters.NotOpen, BrokerUnavailable) as error:
            raise CommandError(str(error)) from None
        self.stdout.write(f"dead letter {row.pk}: {row.status} by {row.settled_by}")

    def _prune(self, *, settled_before, execute: bool, **_):
        cutoff = timezone.now() - settled_before
        if not execute:
            count = DeadLetter.objects.exclude(status=DeadLetter.Status.OPEN).filter(settled_at__lt=cutoff).count()
            self.stdout.write(f"would delete {count} settled dead letter(s); add --execute to delete them")
            return
        self.stdout.write(f"deleted {dead_letters.prune_settled(settled_before=cutoff)} settled dead letter(s)")

    def _row(self, id: int) -> DeadLetter:
        row = DeadLetter.objects.filter(pk=id).first()
        if row is None:
            raise CommandError(f"no dead letter {id}")
        return row
