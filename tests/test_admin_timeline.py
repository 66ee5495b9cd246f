"""The saga page shows its timeline a page at a time: the newest 200 entries, with links back to
older pages, so a saga with 10,000 timeline rows opens as quickly as one with ten."""
import time
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from sagas import services
from sagas.models import Saga, TimelineEntry

pytestmark = pytest.mark.django_db
ENTRIES = 10_000


@pytest.fixture
def viewer(client, django_user_model):
    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="sagas", codename="view_saga"))
    client.force_login(user)
    return client


@pytest.fixture
def long_saga() -> Saga:
    """A saga whose timeline holds 10,000 entries, numbered oldest (0) to newest in their reason."""
    return saga_with_timeline(ENTRIES)


@pytest.fixture
def saga_of_five_pages() -> Saga:
    return saga_with_timeline(1000)


def saga_with_timeline(entries: int) -> Saga:
    saga, _ = services.start_order_saga(user_id="alice", items=[{"product_id": "sku-1", "quantity": 1}],
                                        currency="EUR", payment_method=None)
    TimelineEntry.objects.filter(saga=saga).delete()  # only the numbered entries below
    start = timezone.now() - timedelta(days=1)
    TimelineEntry.objects.bulk_create(
        [TimelineEntry(saga=saga, at=start + timedelta(seconds=n), kind="timeout", reason=str(n)) for n in range(entries)],
        batch_size=2000)
    return saga


def page_of(client, saga, **params):
    return client.get(reverse("admin:sagas_saga_change", args=[saga.pk]), params)


def reasons(response) -> list[int]:
    return [int(entry.reason) for entry in response.context["timeline"]]


def test_the_saga_page_shows_the_newest_200_entries_oldest_first_with_a_link_to_older_ones(viewer, long_saga):
    with CaptureQueriesContext(connection) as queries:
        started = time.perf_counter()
        response = page_of(viewer, long_saga)
        elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.content[:2000]
    assert reasons(response) == list(range(ENTRIES - 200, ENTRIES))
    html = response.content.decode()
    assert "page 1 of 50 (10000 entries" in html
    assert 'href="?timeline_page=2" class="saga-timeline-older"' in html and "saga-timeline-newer" not in html
    timeline_reads = [q["sql"] for q in queries.captured_queries if 'FROM "sagas_timelineentry"' in q["sql"]]
    assert len(timeline_reads) == 2 and "LIMIT 200" in timeline_reads[1]  # a count, then one page; never all rows
    print(f"saga page with {ENTRIES} timeline entries: {elapsed * 1000:.0f} ms, {len(queries)} queries")


def test_older_pages_go_back_to_the_first_entry(viewer, saga_of_five_pages):
    second = page_of(viewer, saga_of_five_pages, timeline_page=2)
    assert reasons(second) == list(range(1000 - 400, 1000 - 200))
    assert 'href="?timeline_page=1" class="saga-timeline-newer"' in second.content.decode()
    oldest = page_of(viewer, saga_of_five_pages, timeline_page=5)
    assert reasons(oldest) == list(range(0, 200))
    assert "saga-timeline-older" not in oldest.content.decode()


@pytest.mark.parametrize(("asked", "shown"), [("999", 5), ("0", 1), ("-3", 1), ("many", 1)])
def test_a_page_number_out_of_range_or_not_a_number_shows_the_nearest_page(viewer, saga_of_five_pages, asked, shown):
    response = page_of(viewer, saga_of_five_pages, timeline_page=asked)
    assert response.status_code == 200
    assert response.context["timeline_page"].number == shown


def test_a_short_timeline_is_one_page_without_links(viewer, saga_of_five_pages):
    TimelineEntry.objects.filter(saga=saga_of_five_pages, at__lt=timezone.now() - timedelta(hours=1)).exclude(
        reason__in=[str(n) for n in range(1000 - 3, 1000)]).delete()
    response = page_of(viewer, saga_of_five_pages)
    assert reasons(response) == [1000 - 3, 1000 - 2, 1000 - 1]
    assert "saga-timeline-pages" not in response.content.decode()
