"""Fill a scratch database with many sagas to measure the support console at scale:

    createdb -h 127.0.0.1 -U postgres console_bench
    export DJANGO_SETTINGS_MODULE=orchestration_site.settings_demo
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/console_bench python manage.py migrate
    DATABASE_URL=... python manage.py seed_sagas --count 100000

Only under the demo or test settings (demo/guard.py): never into a production database.

Rows only (no steps, timeline or outbox, no messages sent): the list page reads nothing else. The
mix looks like production: mostly completed, some compensated, a few in flight, overdue or failed.
"""
import random
import uuid
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from demo.guard import require_demo_settings
from sagas import engine
from sagas.flows import ORDER_FLOW
from sagas.models import Saga

# (status, share of the sagas); running sagas are spread over the three steps
MIX = (("completed", 0.85), ("compensated", 0.08), ("running", 0.04), ("compensating", 0.02), ("failed", 0.01))
FAILURES = ("out_of_stock", "payment_declined", "reduce_stock_timed_out", "compensated by staff: customer called")
BATCH = 5000


@contextmanager
def timestamps_as_given():
    """bulk_create would stamp every row with now(); seeded sagas need their own ages."""
    fields = [Saga._meta.get_field("created_at"), Saga._meta.get_field("updated_at")]
    saved = [(f.auto_now, f.auto_now_add) for f in fields]
    for f in fields:
        f.auto_now = f.auto_now_add = False
    try:
        yield
    finally:
        for f, (auto_now, auto_now_add) in zip(fields, saved):
            f.auto_now, f.auto_now_add = auto_now, auto_now_add


def seeded_saga(rng: random.Random, now) -> Saga:
    status = rng.choices([s for s, _ in MIX], [w for _, w in MIX])[0]
    saga_id, user_id = str(uuid.uuid4()), f"user-{rng.randrange(20_000)}"
    in_flight = status in ("running", "compensating")
    created = now - timedelta(seconds=rng.uniform(0, 3600) if in_flight else rng.uniform(0, 30 * 86400))
    amount = Decimal(rng.randrange(100, 50_000)) / 100
    items = [{"product_id": f"sku-{rng.randrange(1, 50)}", "quantity": rng.randrange(1, 4)}]
    facts = {"user_id": user_id, "items": items, "currency": "EUR", "payment_method": "pm-123", "amount": str(amount)}
    step_statuses = {"completed": ["succeeded"] * 3, "compensated": ["compensated", "failed", "pending"],
                     "compensating": ["compensating", "failed", "pending"],
                     "failed": ["compensating", "failed", "pending"]}.get(status)
    awaiting, deadline = None, None
    if status == "running":
        position = rng.randrange(len(ORDER_FLOW.steps))
        step_statuses = ["succeeded"] * position + ["running"] + ["pending"] * (len(ORDER_FLOW.steps) - position - 1)
    if in_flight:
        # one in ten sagas in flight is overdue: the "stuck" filter finds those and the failed ones
        deadline = now + timedelta(seconds=30) if rng.random() >= 0.1 else now - timedelta(minutes=rng.uniform(1, 60))
        step = ORDER_FLOW.steps[position] if status == "running" else ORDER_FLOW.steps[0]
        command = step.command if status == "running" else step.compensation
        awaiting = engine.Awaiting(step.name, command, 1, deadline.timestamp() - 30, deadline.timestamp())
    order_id = f"o-{uuid.uuid4().hex[:12]}" if status == "completed" else None
    state = engine.SagaState(
        saga_id=saga_id, status=status, facts={**facts, "order_id": order_id},
        steps=tuple(engine.StepState(step.name, s, attempts=1 if s != "pending" else 0)
                    for step, s in zip(ORDER_FLOW.steps, step_statuses)),
        awaiting=awaiting,
        failure_reason=None if status in ("completed", "running") else rng.choice(FAILURES), version=5,
    )
    return Saga(
        id=saga_id, status=status, current_step=state.current_step, user_id=user_id, order_id=order_id,
        total=amount, currency="EUR", items=items, payment_method="pm-123", failure_reason=state.failure_reason,
        state=engine.state_to_dict(state), version=5, deadline=deadline,
        created_at=created, updated_at=created + timedelta(seconds=rng.uniform(0.05, 5)),
    )


class Command(BaseCommand):
    help = "Insert N made-up sagas (rows only) into a scratch database, to measure the admin at scale."

    def add_arguments(self, parser):
        parser.add_argument("--count", type=int, default=100_000)
        parser.add_argument("--seed", type=int, default=7)

    def handle(self, *args, count: int, seed: int, **options):
        require_demo_settings("seed_sagas")
        if not (0 < count <= 10_000_000):
            raise CommandError("--count must be between 1 and 10,000,000")
        rng, now = random.Random(seed), timezone.now()
        with timestamps_as_given():
            for start in range(0, count, BATCH):
                Saga.objects.bulk_create(seeded_saga(rng, now) for _ in range(min(BATCH, count - start)))
        self.stdout.write(f"{count} sagas seeded; {Saga.objects.count()} in the database")
