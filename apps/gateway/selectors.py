from __future__ import annotations

from dataclasses import dataclass

from django.utils import timezone

from apps.gateway.lookups import lookup_key
from apps.gateway.models import ApiKey
from apps.gateway.services import api_key_hash


@dataclass(frozen=True)
class KeyCheck:
    key: ApiKey | None
    problem: str = ""


async def api_key_check(*, raw_key: str) -> KeyCheck:
    """Find the usable key for a presented bearer token, or say why there is none (revocation, expiry
    and the user's deactivation count from the moment they are saved; see ``apps.gateway.lookups``)."""
    if not raw_key:
        return KeyCheck(None, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
    digest = api_key_hash(raw_key)
    key = await lookup_key(key_hash=digest,
                           load=lambda: ApiKey.objects.select_related("user").filter(key_hash=digest).afirst())
    if key is None:
        return KeyCheck(None, f"Incorrect API key provided: {raw_key[:8]}…")
    if key.revoked_at is not None:
        return KeyCheck(None, f"API key {key.prefix}… has been revoked.")
    if key.expires_at is not None and key.expires_at <= timezone.now():
        return KeyCheck(None, f"API key {key.prefix}… expired at {key.expires_at.isoformat()}.")
    if key.user is not None and not key.user.is_active:
        return KeyCheck(None, f"API key {key.prefix}… belongs to an inactive user.")
    return KeyCheck(key)
