"""Encrypting the secrets the platform must store to use later: an external model's upstream API key.

Each secret is a Fernet token (AES-128-CBC with an HMAC-SHA256 over it), so a stored value
can be neither read nor altered without the key. The Fernet key is derived with HKDF-SHA256
from ``LLMP_SECRETS_KEY`` when it is set, else from Django's ``SECRET_KEY``; changing that
source makes every stored secret unreadable (``SecretUnreadable``) until it is entered again.
Setting ``LLMP_SECRETS_KEY`` lets an operator rotate ``SECRET_KEY`` (sessions, signing)
without losing the stored API keys. Secrets stored by an older install that ran on a published
default ``SECRET_KEY`` are re-encrypted under the current key (``secret_reencrypt``).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from functools import cache

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings

from llmplatform.secret_key import PUBLISHED_SECRET_KEYS

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


def _decrypted(token: str, source: str) -> str | None:
    try:
        return _fernet(source).decrypt(token.encode("ascii")).decode()
    except (InvalidToken, UnicodeError, ValueError):
        return None


def secret_decrypt(token: str) -> str:
    """The plain secret behind ``token``; ``""`` for an empty one. Raises ``SecretUnreadable``."""
    if not token:
        return ""
    plain = _decrypted(token, _source_secret())
    if plain is None:
        raise SecretUnreadable(
            "The stored secret cannot be decrypted with this server's key (LLMP_SECRETS_KEY, or the secret key, "
            "DJANGO_SECRET_KEY or LLMP_DATA_DIR/secret_key, when that is unset): the key changed since it was stored, "
            "or the value is corrupt. Enter the secret again.")
    return plain


def secret_legacy_sources() -> list[str]:
    """The published default ``SECRET_KEY``s of older versions that stored secrets may still be
    encrypted under; none when secrets come from ``LLMP_SECRETS_KEY``, which never had a default."""
    return [] if settings.LLMP_SECRETS_KEY else list(PUBLISHED_SECRET_KEYS)


def secret_reencrypt(token: str, *, previous_sources: Sequence[str]) -> str:
    """``token`` in a form the current key reads: ``token`` itself when it already does (or is empty),
    else re-encrypted from the first of ``previous_sources`` whose key decrypts it. Raises
    ``SecretUnreadable`` when none does."""
    if not token or _decrypted(token, _source_secret()) is not None:
        return token
    for source in previous_sources:
        plain = _decrypted(token, source)
        if plain is not None:
            return secret_encrypt(plain)
    raise SecretUnreadable("The stored secret decrypts neither with this server's key nor with any earlier one")


def secret_hint(token: str) -> str | None:
    """The last 4 characters of a stored secret, for telling keys apart; ``""`` when it is too short
    to show any, ``None`` when it cannot be decrypted."""
    try:
        plain = secret_decrypt(token)
    except SecretUnreadable:
        return None
    return plain[-4:] if len(plain) >= _HINT_MIN_LENGTH else ""
