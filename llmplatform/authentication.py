"""Bearer API keys: DRF authentication for the management API, and ``request_user`` for plain views.

Keys are the gateway's; this module finds them through the checker that
``settings.LLMP_API_KEY_CHECKER`` names (a dotted path, as DRF names its authentication classes), an
async callable taking ``raw_key=`` and returning an object with ``key`` (None when refused; else
with ``user``) and ``problem`` (why it was refused). The /v1 gateway checks keys itself.
"""

from __future__ import annotations

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.utils.module_loading import import_string
from rest_framework import authentication, exceptions


def api_key_checker():
    """The configured key checker (``settings.LLMP_API_KEY_CHECKER``)."""
    return import_string(settings.LLMP_API_KEY_CHECKER)


async def api_key_user(*, raw_key: str):
    """The user of a usable API key; None when the key is refused or belongs to no user."""
    check = await api_key_checker()(raw_key=raw_key)
    return check.key.user if check.key is not None else None


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode(errors="replace")
        if not header:
            return None
        scheme, _, raw_key = header.partition(" ")
        if scheme != self.keyword:
            return None
        check = async_to_sync(api_key_checker())(raw_key=raw_key.strip())
        if check.key is None:
            raise exceptions.AuthenticationFailed(check.problem)
        return (check.key.user or AnonymousUser(), check.key)

    def authenticate_header(self, request) -> str:
        return self.keyword


async def request_user(request):
    """For plain Django views outside DRF: the user of a bearer API key or of the session; None when neither."""
    scheme, _, raw_key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and raw_key.strip():
        return await api_key_user(raw_key=raw_key.strip())
    user = await request.auser()
    return user if user.is_authenticated else None
