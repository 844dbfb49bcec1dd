"""Encrypting the secrets the platform must store to use later: an external model's upstream API key.

Each secret is a Fernet token (AES-128-CBC with an HMAC-SHA256 over it), so a stored value
can be neither read nor altered without the key. The Fernet key is derived with HKDF-SHA256
from ``LLMP_SECRETS_KEY`` when it is set, else from Django's ``SECRET_KEY``; changing that
source makes every stored secret unreadable (``SecretUnreadable``) until it is entered again.
Setting ``LLMP_SECRETS_KEY`` lets an operator rotate ``SECRET_KEY`` (sessions, signing)
without losing the stored API keys.
"""

from __future__ import annotations

import base64
from functools import cache

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings

_HKDF_SALT = b"llmplatform.secrets"
_HKDF_INFO = b"fernet key for stored upstream API keys, v1"
# Shorter secrets show no characters at all: four of eight would give too much away.
_HINT_MIN_LENGTH = 12


class SecretUnreadable(Exception):
    """A stored secret cannot be decrypted: it was encrypted under another key, or it is corrupt."""


def _source_secret() -> str:
    return settings.LLMP_SECRETS_KEY or settings.SECRET_KEY


@cache
def _fernet(source: str) -> Fernet:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=_HKDF_INFO).derive(source.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def secret_encrypt(plain: str) -> str:
    """The stored form of ``plain``: a Fernet token (ASCII text); an empty secret stays empty."""
    if not plain:
        return ""
    return _fernet(_source_secret()).encrypt(plain.encode()).decode("ascii")


def secret_decrypt(token: str) -> str:
    """The plain secret behind ``token``; ``""`` for an empty one. Raises ``SecretUnreadable``."""
    if not token:
        return ""
    try:
        return _fernet(_source_secret()).decrypt(token.encode("ascii")).decode()
    except (InvalidToken, UnicodeError, ValueError):
        raise SecretUnreadable(
            "The stored secret cannot be decrypted with this server's key (LLMP_SECRETS_KEY, or "
            "DJANGO_SECRET_KEY when that is unset): the key changed since it was stored, or the value is corrupt. "
            "Enter the secret again."
        ) from None


def secret_hint(token: str) -> str | None:
    """The last 4 characters of a stored secret, for telling keys apart; ``""`` when it is too short
    to show any, ``None`` when it cannot be decrypted."""
    try:
        plain = secret_decrypt(token)
    except SecretUnreadable:
        return None
    return plain[-4:] if len(plain) >= _HINT_MIN_LENGTH else ""
