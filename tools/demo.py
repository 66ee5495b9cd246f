"""`make run`: the service and a demo of its neighbours, so a newcomer sees sagas run end to end.

Migrates the database (SQLite by default), creates a demo staff account for the admin, then runs
the web process on PORT (7001), one saga consumer, and the demo participants and auth service,
until Ctrl-C. Debug mode: never run this as production.
"""
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.stack import ROOT, Stack  # noqa: E402

TRY_IT = """
  The order saga is running:
    web + API        http://localhost:{port}/            (OpenAPI docs: http://localhost:{port}/api/docs/)
    support console  http://localhost:{port}/admin/      user {user}  password {password}
    logs             {logs}/

  Start a saga that completes, then one that is compensated (declined card):
    curl -si -X POST http://localhost:{port}/orders/create_order -H 'Authorization: Bearer demo-alice' \\
         -H 'Content-Type: application/json' -d '{{"items": [{{"product_id": "sku-1", "quantity": 2}}]}}'
    curl -si -X POST http://localhost:{port}/orders/create_order -H 'Authorization: Bearer demo-alice' \\
         -H 'Content-Type: application/json' -d '{{"items": [{{"product_id": "sku-2", "quantity": 1}}], "payment_method": "pm-declined"}}'
  Then follow it:  curl -s http://localhost:{port}/sagas/<saga_id> -H 'Authorization: Bearer demo-alice'
  Demo tokens: demo-alice, demo-bob, demo-staff (staff). Products: sku-1, sku-2, sku-3, sku-sold-out (no stock),
  sku-unorderable (the Order service refuses it), sku-slow; payment method pm-declined is always declined.

  Ctrl-C stops everything.
"""


def main() -> None:
    stack = Stack.create(log_dir=ROOT / "var" / "log", web_port=int(os.environ.get("PORT", 7001)),
                         DJANGO_DEBUG=os.environ.get("DJANGO_DEBUG", "1"))
    stack.manage("migrate", "--no-input")
    account = stack.manage("create_demo_staff").stdout.split()
    stack.start_participants()
    stack.start_consumer()
    stack.start_web()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        stack.wait_auth()
        stack.wait_web()
        print(TRY_IT.format(port=stack.web_port, user=account[0], password=account[1], logs=stack.log_dir), flush=True)
        while not stop:
            for service in stack.services.values():
                if not service.alive():
                    sys.exit(f"{service.name} stopped; see {service.log_path}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping...", flush=True)
        stack.stop_all()


if __name__ == "__main__":
    main()
