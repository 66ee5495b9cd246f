"""The support console in a real browser, against the real service: uvicorn serving HTTP and the
websockets on the test database, the consumer and the participants of the saga_stack fixture.

Screenshots of the pages land in screenshots/ (git-ignored) for a person to look at.
"""
import json
import urllib.request
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from playwright.sync_api import expect, sync_playwright

from lab.stack import ROOT, Stack, free_port
from sagas.engine import TERMINAL
from tests.conftest import CUSTOMER_TOKEN, database_url, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "screenshots"
PASSWORD = "correct horse battery"
LIVE_WAIT_MS = 20_000


@pytest.fixture
def web(saga_stack, auth_service, settings, tmp_path):
    """The web process as production runs it, on the pytest database and Redis, with the demo auth service."""
    # Slow enough that the sku-slow stock reply (1.5 s) is waited for, not given up on.
    settings.SAGA_STEP_TIMEOUT_SECONDS = 5
    stack = Stack.create(
        log_dir=tmp_path, web_port=free_port(), auth_port=auth_service.server_port,
        DJANGO_SETTINGS_MODULE="tests.settings",  # serves static files from the apps, like the demo does
        DATABASE_URL=database_url(),
        REDIS_DB=settings.REDIS_DB, DJANGO_SECRET_KEY=settings.SECRET_KEY,
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost", SAGA_STEP_TIMEOUT_SECONDS=settings.SAGA_STEP_TIMEOUT_SECONDS,
    )
    stack.start_web()
    try:
        stack.wait_web()
        yield f"http://127.0.0.1:{stack.web_port}"
    finally:
        stack.stop_all()
        print((tmp_path / "web.log").read_text()[-3000:])  # shown by pytest when the test failed


@pytest.fixture
def staff_accounts(django_user_model):
    """'support' may do everything to a saga; 'viewer' may only look."""
    view = Permission.objects.filter(content_type__app_label="sagas", codename="view_saga")
    actions = Permission.objects.filter(content_type__app_label="sagas", codename__in=[
        "compensate_saga", "retry_saga", "resume_saga", "mark_step_compensated"])
    for username, permissions in (("support", [*view, *actions]), ("viewer", list(view))):
        user = django_user_model.objects.create_user(username, password=PASSWORD, is_staff=True)
        user.user_permissions.set(permissions)


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run tools/test_setup.sh (make test does)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def logged_in_page(browser, web, username):
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(f"{web}/admin/login/?next=/admin/sagas/saga/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    expect(page.locator("#saga-counts")).to_be_visible()
    return page


def start_order(web, product_id="sku-1") -> str:
    """POST /orders/create_order to the running service, as the shop front does."""
    body = json.dumps({"items": [{"product_id": product_id, "quantity": 2}], "payment_method": "pm-123"}).encode()
    request = urllib.request.Request(f"{web}/orders/create_order", data=body, method="POST", headers={
        "Authorization": f"Bearer {CUSTOMER_TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
        return json.load(response)["saga_id"]


def finished_status(web, saga_id) -> str:
    """Wait for the saga to end, asking the service's API as its customer would.
    (Not the ORM: the test thread runs Playwright's event loop, where Django refuses database calls.)"""
    request = urllib.request.Request(f"{web}/sagas/{saga_id}", headers={"Authorization": f"Bearer {CUSTOMER_TOKEN}"})

    def status():
        with urllib.request.urlopen(request, timeout=5) as response:
            found = json.load(response)["status"]
        return found if found in TERMINAL else None

    return wait_for(status, what=f"saga {saga_id} to finish")


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def test_support_watches_a_saga_complete_and_compensates_another(web, staff_accounts, browser):
    page = logged_in_page(browser, web, "support")
    expect(page.locator("#saga-live-status")).to_have_text("● live")

    saga_id = start_order(web, "sku-slow")  # its stock reply comes 1.5 s late: time to watch it
    page.goto(f"{web}/admin/sagas/saga/{saga_id}/change/")
    expect(page.locator("#saga-status")).to_have_text("running")
    page.evaluate("window.sameDocument = true")  # gone if the page were reloaded
    expect(page.locator("#saga-live-status")).to_have_text("● live")
    expect(page.locator("#saga-status")).to_have_text("completed", timeout=LIVE_WAIT_MS)
    expect(page.locator('[data-step="create_order"] [data-step-status]')).to_have_text("succeeded")
    assert page.evaluate("window.sameDocument") is True
    assert page.locator(".saga-timeline tbody tr").count() >= 7  # start, 3 commands, 3 replies, the event
    screenshot(page, "saga_completed")

    page.goto(f"{web}/admin/sagas/saga/")
    page.evaluate("window.sameDocument = true")
    expect(page.locator("#saga-live-status")).to_have_text("● live")
    other = start_order(web)  # appears on the open list, and finishes there
    expect(page.locator(f'tr:has(code[title="{other}"]) .saga-status')).to_have_text("completed", timeout=LIVE_WAIT_MS)
    assert page.evaluate("window.sameDocument") is True
    expect(page.locator('[data-count="status-completed"] b')).to_have_text("2")
    screenshot(page, "saga_list")

    page.goto(f"{web}/admin/sagas/saga/{other}/change/")
    page.evaluate("window.sameDocument = true")
    page.click('a[data-action="compensate"]')
    plan = page.locator("#saga-plan tbody tr")
    expect(plan).to_have_count(3)
    assert [plan.nth(i).locator("td").nth(1).inner_text() for i in range(3)] == [
        "order.cancel", "payment.refund", "stock.restore"]
    expect(plan.nth(1)).to_contain_text("19.98 EUR")
    screenshot(page, "compensation_plan")
    page.fill("#id_reason", "customer called to cancel")
    page.click("input[type=submit]")
    expect(page.locator(".messagelist .success")).to_contain_text("Compensate")
    page.evaluate("window.sameDocument = true")
    expect(page.locator("#saga-status")).to_have_text("compensated", timeout=LIVE_WAIT_MS)
    assert page.evaluate("window.sameDocument") is True
    expect(page.locator("#saga-failure")).to_contain_text("customer called to cancel")
    expect(page.locator(".saga-undo.is-done")).to_have_count(3)
    screenshot(page, "saga_compensated")


def test_staff_without_the_permission_cannot_compensate(web, staff_accounts, browser):
    saga_id = start_order(web)
    assert finished_status(web, saga_id) == "completed"
    page = logged_in_page(browser, web, "viewer")
    page.goto(f"{web}/admin/sagas/saga/{saga_id}/change/")
    expect(page.locator("#saga-status")).to_have_text("completed")
    expect(page.locator('a[data-action="compensate"]')).to_have_count(0)
    assert page.goto(f"{web}/admin/sagas/saga/{saga_id}/compensate/").status == 403
