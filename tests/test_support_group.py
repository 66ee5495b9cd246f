"""Staff accounts in production: `create_support_group` gives the support console's people what
the console needs, and the demo account stays a debug-mode thing."""
import pytest
from django.contrib.auth.models import Group, Permission
from django.core.management import CommandError, call_command
from django.urls import reverse

from sagas import services
from sagas.admin_actions import ACTIONS
from tests.conftest import ORDER

pytestmark = pytest.mark.django_db

CONSOLE_PERMISSIONS = {"view_saga", "compensate_saga", "retry_saga", "resume_saga", "mark_step_compensated"}


def support_group_codenames() -> set[str]:
    return set(Group.objects.get(name="Support").permissions.values_list("codename", flat=True))


def test_creates_the_group_with_the_consoles_permissions_and_running_again_changes_nothing():
    call_command("create_support_group")
    assert support_group_codenames() == CONSOLE_PERMISSIONS
    call_command("create_support_group")
    assert Group.objects.filter(name="Support").count() == 1
    assert support_group_codenames() == CONSOLE_PERMISSIONS


def test_every_staff_action_of_the_console_is_granted():
    call_command("create_support_group")
    assert {action.permission for action in ACTIONS} <= support_group_codenames()


def test_running_again_keeps_a_permission_an_administrator_added():
    call_command("create_support_group")
    extra = Permission.objects.get(codename="view_user")
    Group.objects.get(name="Support").permissions.add(extra)
    call_command("create_support_group")
    assert support_group_codenames() == CONSOLE_PERMISSIONS | {"view_user"}


def test_a_member_added_with_add_user_works_the_console(client, django_user_model):
    django_user_model.objects.create_user("carol", password="not-used-here")
    call_command("create_support_group", "--add-user", "carol")
    carol = django_user_model.objects.get(username="carol")
    assert carol.is_staff and not carol.is_superuser
    assert carol.groups.filter(name="Support").exists()

    saga, _ = services.start_order_saga(user_id="alice", items=ORDER["items"], currency="EUR", payment_method="pm-1")
    client.force_login(carol)
    assert client.get(reverse("admin:sagas_saga_changelist")).status_code == 200
    page = client.get(reverse("admin:sagas_saga_change", args=[saga.pk]))
    assert page.status_code == 200
    assert [action.slug for action in ACTIONS if f'data-action="{action.slug}"' in page.content.decode()]
    # the console is read-only apart from its actions, and the users' pages are not hers
    assert client.post(reverse("admin:sagas_saga_delete", args=[saga.pk]), {"post": "yes"}).status_code == 403
    assert client.get(reverse("admin:auth_user_changelist")).status_code == 403


def test_an_unknown_user_is_refused_before_anything_changes(django_user_model):
    django_user_model.objects.create_user("carol")
    with pytest.raises(CommandError, match="no user named 'nobody'"):
        call_command("create_support_group", "--add-user", "carol", "--add-user", "nobody")
    assert not Group.objects.filter(name="Support").exists()
    assert not django_user_model.objects.get(username="carol").is_staff


def test_the_demo_account_is_refused_outside_debug_mode(settings, django_user_model):
    settings.DEBUG = False
    with pytest.raises(CommandError, match="debug mode"):
        call_command("create_demo_staff")
    assert not django_user_model.objects.exists()
