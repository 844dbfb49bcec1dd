"""Writes of the gateway: API keys and request history."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone

from apps.gateway.models import ApiKey, RequestLog

API_KEY_PREFIX = "llmp-"
VISIBLE_PREFIX_LENGTH = 12
# The longest expiry a key may be given (a key that should never expire is given none).
API_KEY_MAX_LIFETIME = timedelta(days=36500)


def api_key_hash(raw_key: str) -> str:
    """Keys are 256-bit random strings, so a plain SHA-256 is a safe, fast digest for lookup."""
    return hashlib.sha256(raw_key.encode()).hexdigest()


def api_key_create(
    *, name: str, user: AbstractBaseUser | None = None, expires_in: timedelta | None = None
) -> tuple[ApiKey, str]:
    """Create a key and return it with its plain text, which is never stored and never shown again."""
    if not name.strip():
        raise ValueError("an API key needs a name")
    if expires_in is not None and expires_in.total_seconds() <= 0:
        raise ValueError("expiry must be in the future")
    if expires_in is not None and expires_in > API_KEY_MAX_LIFETIME:
        raise ValueError(f"expiry must be at most {API_KEY_MAX_LIFETIME.days} days away")
    raw_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.objects.create(
        name=name.strip(),
        user=user,
        prefix=raw_key[:VISIBLE_PREFIX_LENGTH],
        key_hash=api_key_hash(raw_key),
        expires_at=timezone.now() + expires_in if expires_in is not None else None,
    )
    return key, raw_key


def api_key_revoke(*, key: ApiKey) -> ApiKey:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    return key


async def api_key_touch(*, key: ApiKey) -> None:
    """Record use, at most once a minute per key so busy keys do not write on every request."""
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at > timedelta(seconds=60):
        key.last_used_at = now
        await ApiKey.objects.filter(pk=key.pk).aupdate(last_used_at=now)


def request_log_prune(*, now=None) -> int:
    """Delete request history older than the retention period; returns how many rows went."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.LLMP_REQUEST_LOG_RETENTION_DAYS)
    deleted, _ = RequestLog.objects.filter(created_at__lt=cutoff).delete()
    return deleted
