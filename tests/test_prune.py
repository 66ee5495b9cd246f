"""prune_sagas: finished sagas older than the retention go, with their timeline and sent
outbox rows, in batches; nothing else does, and a dry run deletes nothing."""
import io
import re
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from hypothesis import given
from hypothesis import strategies as st

from sagas.management.commands.prune_sagas import age
from sagas.models import OutboxMessage, Saga, TimelineEntry

pytestmark = pytest.mark.django_db
OLD, RECENT = timedelta(days=31), timedelta(days=29)


def saga_row(status: str, *, last_change: timedelta, unsent: bool = False) -> str:
    """A saga row with a step, two timeline entries and a sent outbox message, last changed `last_change` ago."""
    saga = Saga.objects.create(status=status, user_id="alice", currency="EUR", items=[], state={})
    for kind in ("started", "event"):
        TimelineEntry.objects.create(saga=saga, at=timezone.now(), kind=kind)
    OutboxMessage.objects.create(saga=saga, exchange="saga.events", routing_key=f"saga.{status}", body={},
                                 sent_at=timezone.now())
    if unsent:
        OutboxMessage.objects.create(saga=saga, exchange="saga.events", routing_key=f"saga.{status}", body={})
    Saga.objects.filter(pk=saga.pk).update(updated_at=timezone.now() - last_change)
    return str(saga.pk)


def prune(*args) -> str:
    out = io.StringIO()
    call_command("prune_sagas", *args, stdout=out)
    return out.getvalue()


def remaining() -> set[str]:
    return {str(pk) for pk in Saga.objects.values_list("pk", flat=True)}


@pytest.fixture
def sagas_of_every_kind():
    return {
        "old completed": saga_row("completed", last_change=OLD),
        "old compensated": saga_row("compensated", last_change=OLD),
        "old failed": saga_row("failed", last_change=OLD),
        "old running": saga_row("running", last_change=OLD),
        "old compensating": saga_row("compensating", last_change=OLD),
        "old completed, event not sent yet": saga_row("completed", last_change=OLD, unsent=True),
        "recent completed": saga_row("completed", last_change=RECENT),
    }


def test_a_dry_run_counts_what_would_go_and_deletes_nothing(sagas_of_every_kind):
    output = prune("--finished-before", "30d")
    assert "would delete 2 sagas (4 timeline entries, 2 sent outbox messages)" in output
    assert "--execute" in output and "failed sagas are kept" in output
    assert remaining() == set(sagas_of_every_kind.values())


def test_execute_deletes_old_completed_and_compensated_sagas_with_everything_they_own(sagas_of_every_kind):
    output = prune("--finished-before", "30d", "--execute")
    gone = {sagas_of_every_kind["old completed"], sagas_of_every_kind["old compensated"]}
    assert remaining() == set(sagas_of_every_kind.values()) - gone
    assert not TimelineEntry.objects.filter(saga_id__in=gone).exists()
    assert not OutboxMessage.objects.filter(saga_id__in=gone).exists()
    assert "done: deleted 2 sagas (4 timeline entries, 2 sent outbox messages)" in output


def test_failed_sagas_go_only_when_asked_for(sagas_of_every_kind):
    prune("--finished-before", "30d", "--yes", "--include-failed")
    assert sagas_of_every_kind["old failed"] not in remaining()
    assert sagas_of_every_kind["old completed, event not sent yet"] in remaining()
    assert sagas_of_every_kind["old running"] in remaining()


def test_a_saga_with_an_unsent_outbox_row_is_kept_until_the_row_is_sent(sagas_of_every_kind):
    waiting = sagas_of_every_kind["old completed, event not sent yet"]
    prune("--finished-before", "30d", "--execute")
    assert waiting in remaining()
    OutboxMessage.objects.filter(saga_id=waiting).update(sent_at=timezone.now())
    prune("--finished-before", "30d", "--execute")
    assert waiting not in remaining()


def test_deletes_in_batches_and_reports_each():
    sagas = {saga_row("completed", last_change=OLD + timedelta(minutes=n)) for n in range(5)}
    output = prune("--finished-before", "30d", "--execute", "--batch-size", "2")
    assert re.findall(r"deleted (\d) sagas .*; (\d) sagas so far", output) == [("2", "2"), ("2", "4"), ("1", "5")]
    assert not remaining() & sagas


@given(number=st.integers(1, 9_999_999), unit=st.sampled_from("dhm"))
def test_an_age_is_a_whole_number_of_days_hours_or_minutes(number, unit):
    assert age(f"{number}{unit}") == timedelta(**{{"d": "days", "h": "hours", "m": "minutes"}[unit]: number})


@given(text=st.text().filter(lambda t: not re.fullmatch(r"[1-9][0-9]{0,6}[dhm]", t)))
def test_anything_else_is_refused_naming_the_option(text):
    with pytest.raises(CommandError, match="--finished-before"):
        call_command("prune_sagas", "--finished-before", text, stdout=io.StringIO())


@pytest.mark.parametrize("size", ["0", "10001", "lots"])
def test_a_bad_batch_size_is_refused(size):
    with pytest.raises(CommandError, match="--batch-size"):
        call_command("prune_sagas", "--finished-before", "1d", "--batch-size", size)


def test_the_age_is_required():
    with pytest.raises(CommandError, match="--finished-before"):
        call_command("prune_sagas")
