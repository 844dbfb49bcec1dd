"""Django's ``SECRET_KEY``: from ``DJANGO_SECRET_KEY``, or generated once per install.

Without ``DJANGO_SECRET_KEY`` an install makes its own random key the first time any of its
processes starts and keeps it in ``DATA_DIR/secret_key`` (mode 0600); every later process,
and every process starting at the same moment, reads that one file. A worker that pulls
model files from a server on another machine must sign with the server's key, so it gets the
key from the environment or does not start. No published value is ever accepted as a key.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from llmplatform.env import ImproperlyConfiguredEnv, env_str

SECRET_KEY_FILE_NAME = "secret_key"
# Django's own deploy check (security.W009) asks for at least 50 characters.
SECRET_KEY_MIN_LENGTH = 50
# Keys that older versions used when none was given: the settings' default and the compose
# file's. Anyone can sign with them, so they are refused; stored secrets that were encrypted
# under them are re-encrypted under the install's new key (apps.models migration 0003).
PUBLISHED_SECRET_KEYS = ("insecure-dev-key-change-me-in-production", "change-me")

_GENERATE_HINT = "e.g. DJANGO_SECRET_KEY=$(openssl rand -hex 32)"
_NEW_KEY_COST = ("deleting it makes a new key, which ends every session and, unless LLMP_SECRETS_KEY is set, "
                 "makes the stored upstream API keys unreadable")


def secret_key_resolve(*, data_dir: Path) -> str:
    """The key this process signs with: ``DJANGO_SECRET_KEY`` when set, else the install's own
    from ``data_dir``, made on first use. Raises ImproperlyConfiguredEnv for a published key,
    for a remote worker without ``DJANGO_SECRET_KEY``, and for a key file it cannot use."""
    given = env_str("DJANGO_SECRET_KEY", "")
    if given:
        if given in PUBLISHED_SECRET_KEYS:
            raise ImproperlyConfiguredEnv(
                f"DJANGO_SECRET_KEY is {given!r}, a published default that anyone can sign with: set a long random "
                f"value ({_GENERATE_HINT}), or unset it to let this install generate its own")
        return given
    remote_worker_secret_check()
    return secret_key_load_or_create(data_dir / SECRET_KEY_FILE_NAME)


def remote_worker_secret_check() -> None:
    """Raise ImproperlyConfiguredEnv when this process pulls from a remote server
    (``LLMP_SERVER_URL``) but has no ``DJANGO_SECRET_KEY``: a key of its own would sign blob
    tokens that the server rejects."""
    if env_str("LLMP_SERVER_URL", "") and not env_str("DJANGO_SECRET_KEY", ""):
        raise ImproperlyConfiguredEnv(
            "LLMP_SERVER_URL is set but DJANGO_SECRET_KEY is not: a worker that pulls from a remote server needs "
            "the server's DJANGO_SECRET_KEY (its value, or the contents of the server's LLMP_DATA_DIR/secret_key)")


def secret_key_load_or_create(path: Path) -> str:
    """The key stored at ``path``; when there is no file, a new random key, stored there first.

    Processes that start at once agree on one key: the key is written whole to a file of its
    own, then published with a hard link, which fails when ``path`` already exists, so a
    reader sees either no file or a complete one and the loser of a race reads the winner's.
    An empty, short or unreadable file raises ImproperlyConfiguredEnv; it is never replaced.
    """
    try:
        return _secret_key_read(path)
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(48)  # 64 characters, 384 bits
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(key + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(draft, path)
            except FileExistsError:
                return _secret_key_read(path)  # another process got there first: its key wins
        finally:
            draft.unlink(missing_ok=True)
    except OSError as exc:
        raise ImproperlyConfiguredEnv(
            f"DJANGO_SECRET_KEY is not set and this install's key file {path} cannot be created ({exc}): make its "
            f"directory writable, or set DJANGO_SECRET_KEY ({_GENERATE_HINT})") from None
    return key


def _secret_key_read(path: Path) -> str:
    try:
        key = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeError) as exc:
        raise ImproperlyConfiguredEnv(
            f"The key file {path} cannot be read ({exc}). Repair it, or set DJANGO_SECRET_KEY; {_NEW_KEY_COST}") from None
    if len(key) < SECRET_KEY_MIN_LENGTH:
        raise ImproperlyConfiguredEnv(
            f"The key file {path} holds {len(key)} characters, fewer than {SECRET_KEY_MIN_LENGTH}: it is damaged. "
            f"Restore it from a backup, or set DJANGO_SECRET_KEY; {_NEW_KEY_COST}")
    return key
