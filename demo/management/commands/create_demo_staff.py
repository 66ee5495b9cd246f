import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from demo.guard import require_demo_settings


class Command(BaseCommand):
    help = ("Create (or reset) the demo support account with a fresh password; prints 'username password'. "
            "Demo settings, debug mode only.")

    def add_arguments(self, parser):
        parser.add_argument("--username", default="support")

    def handle(self, *args, username: str, **options):
        require_demo_settings("create_demo_staff")
        if not settings.DEBUG:
            raise CommandError("refusing to create a demo account outside debug mode (DJANGO_DEBUG=1)")
        password = secrets.token_urlsafe(12)
        user, _ = get_user_model().objects.get_or_create(username=username)
        user.is_staff = user.is_superuser = True
        user.set_password(password)
        user.save()
        self.stdout.write(f"{username} {password}")
