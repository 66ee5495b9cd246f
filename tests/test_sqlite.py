"""The default database is a SQLite file (contract section 1): the hot path's plain SQL
(sagas/records.py) is written for PostgreSQL first, so it runs here on SQLite too, in a process
of its own (the suite's processes are on PostgreSQL)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SAGA_ON_SQLITE = """
import json
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from sagas import runtime, services
from sagas.engine import Reply
from sagas.models import OutboxMessage, Saga, TimelineEntry
from sagas.outbox import SentMarker

published = []

class Kept:  # the publisher: no broker needed to walk the saga through its transitions
    def publish(self, rows):
        published.extend(row.routing_key for row in rows)
    def stop(self):
        pass

class Quiet:
    def saga_changed(self, state):
        pass
    def stop(self):
        pass

own = runtime.Runtime(publisher=Kept(), sent_marker=SentMarker(), live=Quiet())
runtime.install(own)
saga, _ = services.start_order_saga(user_id="alice", items=[{"product_id": "sku-1", "quantity": 2}],
                                    currency="EUR", payment_method=None)
saga_id = str(saga.pk)
fates = []
for command, data in (("stock.reduce", {"total": "9.99"}), ("payment.take", {}), ("order.create", {"order_id": "o-1"})):
    [outcome] = services.apply_replies([services.IncomingReply(saga_id, Reply(command, 1, "success", data=data),
                                                               f"m-{command}")], runtime=own)
    fates.append(str(outcome.fate))
row = Saga.objects.get(pk=saga_id)
outbox = OutboxMessage.objects.filter(saga_id=saga_id).order_by("id").values_list("routing_key", flat=True)
print(json.dumps({"fates": fates, "status": row.status, "version": row.version, "order_id": row.order_id,
                  "total": str(row.total), "published": published, "outbox": list(outbox),
                  "replies": TimelineEntry.objects.filter(saga_id=saga_id, kind="reply", applied=True).count()}))
"""


def test_a_saga_goes_through_every_transition_on_sqlite(tmp_path):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "orchestration_site.settings", "DJANGO_DEBUG": "0",
           "DJANGO_SECRET_KEY": "sqlite-test-" + "x" * 40, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
           "LOG_LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, "-c", SAGA_ON_SQLITE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["fates"] == ["applied", "applied", "applied"], result
    assert (result["status"], result["version"], result["order_id"], result["total"]) == ("completed", 4, "o-1", "9.99")
    assert result["published"] == result["outbox"] == ["stock.reduce", "payment.take", "order.create", "saga.completed"]
    assert result["replies"] == 3
