from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from apps.gateway.services import API_KEY_MAX_LIFETIME, api_key_create


class Command(BaseCommand):
    help = "Create an API key for /v1 and the management API. The key is printed once, on the last line."

    def add_arguments(self, parser):
        parser.add_argument("--name", required=True, help="what the key is for")
        parser.add_argument("--user", help="username that owns the key (needed for the management API)")
        parser.add_argument("--expires-in", type=int, metavar="SECONDS", help="expire after this many seconds")

    def handle(self, *args, name, user, expires_in, **options):
        owner = None
        if user:
            try:
                owner = get_user_model().objects.get(username=user)
            except get_user_model().DoesNotExist:
                raise CommandError(f"no user named {user!r}; create it with 'python manage.py createsuperuser'")
        if expires_in is not None and not 0 < expires_in <= API_KEY_MAX_LIFETIME.total_seconds():
            raise CommandError(f"--expires-in must be a positive number of seconds, at most "
                               f"{int(API_KEY_MAX_LIFETIME.total_seconds())}")
        try:
            key, raw_key = api_key_create(name=name, user=owner,
                                          expires_in=timedelta(seconds=expires_in) if expires_in else None)
        except ValueError as exc:
            raise CommandError(str(exc))
        expiry = f", expires {key.expires_at.isoformat()}" if key.expires_at else ""
        self.stderr.write(f"Created API key {key.name!r} ({key.prefix}…{expiry}). It is shown only now:")
        self.stdout.write(raw_key)
