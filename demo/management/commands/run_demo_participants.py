"""Run the demo Stock, Payment and Order participants (and Shipping, with --with-shipping) and the
demo auth service until SIGTERM/SIGINT."""
from __future__ import annotations

import signal
import threading

from django.core.management.base import BaseCommand, CommandError

from demo.auth_server import default_auth_port, serve_auth
from demo.catalogue import describe
from demo.participants import default_ledger_path, reset_ledger, start_participants


class Command(BaseCommand):
    help = "Run the demo participants (stock, payment, order; shipping if asked) and the demo auth service."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--ledger", help=f"SQLite ledger file (default {default_ledger_path()})")
        parser.add_argument("--reset", action="store_true", help="forget all effects and restock from the catalogue")
        parser.add_argument("--no-auth", action="store_true", help="do not run the demo auth service")
        parser.add_argument("--with-shipping", action="store_true",
                            help="also run the Shipping participant (it declares shipping.commands), for a four-step flow")
        parser.add_argument("--auth-port", type=int, help="auth service port (default: from AUTHERIZATION_SERVER_PORT)")
        # 0.0.0.0 in a container, where the orchestrator calls it from another one (docker-compose.yml)
        parser.add_argument("--auth-host", default="127.0.0.1", help="address the auth service listens on (default 127.0.0.1)")

    def handle(self, *args, **options) -> None:
        ledger_path = options["ledger"] or default_ledger_path()
        if options["reset"]:
            reset_ledger(ledger_path)

        stop = threading.Event()
        # The threads finish the message in hand and ack it before they exit.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())

        auth = None
        if not options["no_auth"]:
            port = options["auth_port"] or default_auth_port()
            try:
                auth = serve_auth(port, host=options["auth_host"])
            except OSError as error:
                raise CommandError(f"cannot run the demo auth service on port {port}: {error}") from error
        threads = start_participants(ledger_path=ledger_path, should_stop=stop.is_set,
                                     with_shipping=options["with_shipping"])

        auth_note = f"auth on {options['auth_host']}:{auth.server_port}" if auth else "no auth service"
        self.stdout.write(f"demo participants running (ledger {ledger_path}, {auth_note}); {describe()}")

        try:
            while not stop.wait(0.5):
                if not all(thread.is_alive() for thread in threads):
                    stop.set()
                    raise CommandError("a demo participant stopped unexpectedly; see the log")
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            if auth is not None:
                auth.shutdown()
                auth.server_close()
