"""Stored upstream API keys survive the move off the published default SECRET_KEY.

An install that ran without DJANGO_SECRET_KEY signed with a default everyone knows and
encrypted its upstream keys under a Fernet key derived from it. Its keys must stay readable
once the install has a key of its own, and nothing that cannot be read may be destroyed.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from apps.models.models import ExternalEndpoint
from apps.models.secrets import secret_decrypt, secret_encrypt, secret_legacy_sources
from apps.models.services import external_keys_reencrypt, model_register_external
from llmplatform.secret_key import PUBLISHED_SECRET_KEYS

ROOT = Path(__file__).resolve().parent.parent.parent
OLD_DEFAULT_SECRET = "insecure-dev-key-change-me-in-production"
OLD_COMPOSE_SECRET = "change-me"


def fernet_of_an_old_install(secret_key: str) -> Fernet:
    """The Fernet key that earlier versions derived from SECRET_KEY, written out here on purpose:
    tokens that old installs stored were made with exactly this, whatever the code says today."""
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"llmplatform.secrets",
                   info=b"fernet key for stored upstream API keys, v1").derive(secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def stored_under(fernet: Fernet, plain: str) -> str:
    return fernet.encrypt(plain.encode()).decode("ascii")


def an_external_model_storing(token: str) -> str:
    name = f"upstream-{uuid.uuid4().hex[:8]}"
    model_register_external(name=name, base_url="http://upstream.invalid/v1", api_key="sk-placeholder-key")
    ExternalEndpoint.objects.filter(pk=name).update(api_key_encrypted=token)
    return name


def stored_token(name: str) -> str:
    return ExternalEndpoint.objects.get(pk=name).api_key_encrypted


@pytest.fixture
def secrets_from_secret_key(settings):
    settings.LLMP_SECRETS_KEY = ""


def test_the_published_defaults_are_the_legacy_sources_while_secrets_come_from_secret_key(secrets_from_secret_key):
    assert OLD_DEFAULT_SECRET in PUBLISHED_SECRET_KEYS and OLD_COMPOSE_SECRET in PUBLISHED_SECRET_KEYS
    assert secret_legacy_sources() == list(PUBLISHED_SECRET_KEYS)


def test_with_llmp_secrets_key_set_no_legacy_source_applies(settings):
    settings.LLMP_SECRETS_KEY = "an operator's own secrets key, never a default"
    assert secret_legacy_sources() == []


@pytest.mark.parametrize("old_secret", [OLD_DEFAULT_SECRET, OLD_COMPOSE_SECRET])
def test_a_key_stored_under_an_old_default_secret_becomes_readable_under_the_current_key(secrets_from_secret_key,
                                                                                        old_secret):
    name = an_external_model_storing(stored_under(fernet_of_an_old_install(old_secret), "sk-upstream-0123456789"))
    done = external_keys_reencrypt(previous_sources=secret_legacy_sources(),
                                   endpoints=ExternalEndpoint.objects.filter(pk=name))
    assert done.reencrypted == [name] and done.unreadable == []
    assert secret_decrypt(stored_token(name)) == "sk-upstream-0123456789"


def test_a_key_already_under_the_current_key_is_not_rewritten(secrets_from_secret_key):
    token = secret_encrypt("sk-current-0123456789")
    name = an_external_model_storing(token)
    done = external_keys_reencrypt(previous_sources=secret_legacy_sources(),
                                   endpoints=ExternalEndpoint.objects.filter(pk=name))
    assert done.reencrypted == [] and done.unreadable == []
    assert stored_token(name) == token


def test_a_key_under_no_known_secret_is_left_as_it_is_and_logged(secrets_from_secret_key, caplog):
    token = stored_under(Fernet(Fernet.generate_key()), "sk-lost-0123456789")
    name = an_external_model_storing(token)
    with caplog.at_level(logging.WARNING, logger="apps.models.services.external"):
        done = external_keys_reencrypt(previous_sources=secret_legacy_sources(),
                                       endpoints=ExternalEndpoint.objects.filter(pk=name))
    assert done.unreadable == [name] and done.reencrypted == []
    assert stored_token(name) == token
    assert [record.getMessage() for record in caplog.records if name in record.getMessage()], caplog.text


def test_with_llmp_secrets_key_set_a_key_under_an_old_default_is_not_taken_over(settings):
    settings.LLMP_SECRETS_KEY = "an operator's own secrets key, never a default"
    token = stored_under(fernet_of_an_old_install(OLD_DEFAULT_SECRET), "sk-upstream-0123456789")
    name = an_external_model_storing(token)
    done = external_keys_reencrypt(previous_sources=secret_legacy_sources(),
                                   endpoints=ExternalEndpoint.objects.filter(pk=name))
    assert done.unreadable == [name]
    assert stored_token(name) == token


UPGRADE = """
import os
from django.core.management import call_command
from apps.models.services import model_register_external
from apps.models.models import ExternalEndpoint
from apps.models.secrets import secret_decrypt

call_command("migrate", verbosity=0)
model_register_external(name="old-upstream", base_url="http://upstream.invalid/v1", api_key="sk-placeholder-key")
ExternalEndpoint.objects.filter(pk="old-upstream").update(api_key_encrypted=os.environ["TOKEN_OF_THE_OLD_INSTALL"])
call_command("migrate", "llm_models", "0002", verbosity=0)  # the database as the old install left it
call_command("migrate", verbosity=0)  # the upgrade
print(secret_decrypt(ExternalEndpoint.objects.get(pk="old-upstream").api_key_encrypted))
"""


def test_upgrading_an_install_that_ran_on_the_default_secret_keeps_its_upstream_keys_readable(tmp_path):
    env = {name: value for name, value in os.environ.items() if name not in ("DJANGO_SECRET_KEY", "LLMP_SERVER_URL")}
    env.update(LLMP_DATA_DIR=str(tmp_path / "data"), LLMP_MODELS_DIR=str(tmp_path / "data" / "models"),
               DATABASE_URL=f"sqlite:///{tmp_path / 'old-install.sqlite3'}", LLMP_SECRETS_KEY="",
               TOKEN_OF_THE_OLD_INSTALL=stored_under(fernet_of_an_old_install(OLD_DEFAULT_SECRET), "sk-kept-0123456789"))
    result = subprocess.run([sys.executable, "manage.py", "shell", "-c", UPGRADE], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "sk-kept-0123456789"
    assert (tmp_path / "data" / "secret_key").is_file(), "the install did not make a key of its own"
