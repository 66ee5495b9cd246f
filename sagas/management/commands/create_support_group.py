from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.management.base import BaseCommand, CommandError

GROUP_NAME = "Support"
# what the support console needs: seeing sagas (their steps and timeline show on the saga's page)
# and each staff action; nothing that adds, edits or deletes rows
PERMISSIONS = ("view_saga", "compensate_saga", "retry_saga", "resume_saga", "mark_step_compensated")


class Command(BaseCommand):
    help = (f"Create the {GROUP_NAME!r} group with the support console's permissions (safe to run again: it only "
            "adds what is missing); --add-user USERNAME also makes that existing user staff and a member.")

    def add_arguments(self, parser):
        parser.add_argument("--add-user", metavar="USERNAME", action="append", default=[],
                            help="an existing user to make staff and put in the group (may be repeated)")

    def handle(self, *args, add_user: list[str], **options):
        permissions = list(Permission.objects.filter(content_type__app_label="sagas", codename__in=PERMISSIONS))
        missing = set(PERMISSIONS) - {permission.codename for permission in permissions}
        if missing:
            raise CommandError(f"permissions {', '.join(sorted(missing))} do not exist yet: run `manage.py migrate` first")
        users = get_user_model().objects
        unknown = [name for name in add_user if not users.filter(username=name).exists()]
        if unknown:  # checked before anything changes, so a typo changes nothing
            raise CommandError(f"no user named {', '.join(map(repr, unknown))}: create it first (manage.py createsuperuser "
                               "makes a superuser; the admin's Users page or manage.py shell make a plain one)")
        group, created = Group.objects.get_or_create(name=GROUP_NAME)
        # add only: a permission an administrator granted the group on purpose stays
        group.permissions.add(*permissions)
        self.stdout.write(f"{'created' if created else 'updated'} group {GROUP_NAME!r}: {', '.join(PERMISSIONS)}")
        for name in add_user:
            user = users.get(username=name)
            user.is_staff = True
            user.save(update_fields=["is_staff"])
            user.groups.add(group)
            self.stdout.write(f"{name} is staff and in {GROUP_NAME!r}")
