"""Bearer API keys for the management API (DRF); the /v1 gateway checks keys itself."""

from __future__ import annotations

from asgiref.sync import async_to_sync
from django.contrib.auth.models import AnonymousUser
from rest_framework import authentication, exceptions

from apps.gateway.selectors import api_key_check


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode(errors="replace")
        if not header:
            return None
        scheme, _, raw_key = header.partition(" ")
        if scheme != self.keyword:
            return None
        check = async_to_sync(api_key_check)(raw_key=raw_key.strip())
        if check.key is None:
            raise exceptions.AuthenticationFailed(check.problem)
        return (check.key.user or AnonymousUser(), check.key)

    def authenticate_header(self, request) -> str:
        return self.keyword


async def request_user(request):
    """For plain Django views outside DRF: the user of a bearer API key or of the session; None when neither."""
    scheme, _, raw_key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and raw_key.strip():
        check = await api_key_check(raw_key=raw_key.strip())
        return check.key.user if check.key is not None else None
    user = await request.auser()
    return user if user.is_authenticated else None
