"""Bearer API keys: DRF authentication for the management API, and ``request_user`` for plain views.

Keys are the gateway's; this module finds them through the checker that
``settings.LLMP_API_KEY_CHECKER`` names (a dotted path, as DRF names its authentication classes), an
async callable taking ``raw_key=`` and returning an object with ``key`` (None when refused; else
with ``user``) and ``problem`` (why it was refused). The ASGI guard (``llmplatform.request_guard``) checks a
request's bearer key before its body is read and leaves the check in the ASGI scope; ``guard_key_check``
hands it to the views, so no key is checked twice.
"""

from __future__ import annotations

from importlib import import_module

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model, load_backend
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import ValidationError
from django.utils.crypto import constant_time_compare
from django.utils.module_loading import import_string
from rest_framework import authentication, exceptions

# Where the ASGI guard leaves its check of the request's bearer key (the checker's result) in the scope.
SCOPE_KEY_CHECK = "llmp.key_check"


def api_key_checker():
    """The configured key checker (``settings.LLMP_API_KEY_CHECKER``)."""
    return import_string(settings.LLMP_API_KEY_CHECKER)


def guard_key_check(request):
    """The ASGI guard's check of this request's bearer key; None when it checked none (no bearer key, or a
    request that did not come through the guard)."""
    return getattr(request, "scope", {}).get(SCOPE_KEY_CHECK)


async def session_user(*, session_key: str):
    """The active user a session cookie is logged in as, else None. Reads only: unlike
    ``django.contrib.auth.aget_user`` it never flushes nor cycles the session, which the app's own
    middleware does when it serves the request."""
    data = await import_module(settings.SESSION_ENGINE).SessionStore(session_key).aload()
    backend_path = data.get(BACKEND_SESSION_KEY)
    if data.get(SESSION_KEY) is None or backend_path not in settings.AUTHENTICATION_BACKENDS:
        return None
    try:
        user_id = get_user_model()._meta.pk.to_python(data[SESSION_KEY])
    except ValidationError:
        return None
    user = await load_backend(backend_path).aget_user(user_id)  # None for an inactive user
    if user is None or not hasattr(user, "get_session_auth_hash"):
        return user
    session_hash = data.get(HASH_SESSION_KEY) or ""
    hashes = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]
    return user if any(constant_time_compare(session_hash, known) for known in hashes) else None


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
        check = guard_key_check(request) or async_to_sync(api_key_checker())(raw_key=raw_key.strip())
        if check.key is None:
            raise exceptions.AuthenticationFailed(check.problem)
        return (check.key.user or AnonymousUser(), check.key)

    def authenticate_header(self, request) -> str:
        return self.keyword


async def request_user(request):
    """For plain Django views outside DRF: the user of a bearer API key or of the session; None when neither."""
    scheme, _, raw_key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and raw_key.strip():
        check = guard_key_check(request)
        if check is None:
            return await api_key_user(raw_key=raw_key.strip())
        return check.key.user if check.key is not None else None
    user = await request.auser()
    return user if user.is_authenticated else None
