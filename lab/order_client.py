"""The one HTTP order client of the lab (the benchmark and the fault suite): POST
/orders/create_order as a demo customer, one connection per thread.

With an Idempotency-Key it is a careful client: connection errors, timeouts and 503 are retried
with the same key until `give_up_after`, so an order counts as accepted only once a 2xx came
back, and never twice. Without a key it sends once: a retry could start a second saga.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import requests

from demo.catalogue import CUSTOMER_TOKEN

RETRY_STATUSES = (503,)


@dataclass
class Submission:
    """One order as the client sent it, and what came back."""

    body: dict
    key: str | None = None  # the Idempotency-Key; None: sent once, not retried
    status_code: int | None = None
    saga_id: str | None = None
    sent: float | None = None  # time.perf_counter() of the first POST
    answered: float | None = None  # time.perf_counter() of the 2xx
    accepted_at: float | None = None  # time.time() of the 2xx, to compare with the database's clock
    problems: Counter = field(default_factory=Counter)

    @property
    def accepted(self) -> bool:
        return self.saga_id is not None


class OrderClient:
    def __init__(self, base_url: str, *, token: str = CUSTOMER_TOKEN, give_up_after: float = 120.0,
                 timeout: tuple[float, float] = (2.0, 20.0)):
        self.url = f"{base_url}/orders/create_order"
        self.token = token
        self.give_up_after = give_up_after
        self.timeout = timeout
        self._local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def submit(self, order: Submission) -> Submission:
        end, pause = time.monotonic() + self.give_up_after, 0.1
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        if order.key is not None:
            headers["Idempotency-Key"] = order.key
        body = json.dumps(order.body)
        while True:
            order.sent = order.sent or time.perf_counter()
            try:
                response = self._session().post(self.url, data=body, headers=headers, timeout=self.timeout)
            except requests.RequestException as error:
                order.problems[type(error).__name__] += 1
                self._local.__dict__.pop("session", None)  # a fresh connection after a dropped one
            else:
                order.status_code = response.status_code
                if 200 <= response.status_code < 300:
                    order.answered, order.accepted_at = time.perf_counter(), time.time()
                    try:
                        order.saga_id = response.json()["saga_id"]
                    except (ValueError, KeyError, TypeError):
                        order.problems[f"http {response.status_code} without a saga_id"] += 1
                    return order
                order.problems[f"http {response.status_code}"] += 1
                if response.status_code not in RETRY_STATUSES:
                    return order
            if order.key is None or time.monotonic() + pause > end:
                return order
            time.sleep(pause)
            pause = min(pause * 2, 2.0)
