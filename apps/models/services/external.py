"""External models: registry ids that forward to another OpenAI-compatible server.

Writes only; the gateway's side (forwarding requests) is ``apps.gateway.upstream``. Errors are
the registry's own ``ModelError`` (400) and ``ModelConflict`` (409), so every API surface turns
them into HTTP the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import IntegrityError, transaction
from django.db.models import QuerySet

from apps.models.models import ExternalEndpoint, ModelSource, RegisteredModel
from apps.models.secrets import SecretUnreadable, secret_encrypt, secret_reencrypt
from apps.models.services.registry import ModelConflict, ModelError, model_id_check
from llmplatform.epochs import EPOCH_MODELS, epoch_bump

logger = logging.getLogger(__name__)

_BASE_URL_MAX_LENGTH = ExternalEndpoint._meta.get_field("base_url").max_length
_UPSTREAM_MODEL_MAX_LENGTH = ExternalEndpoint._meta.get_field("upstream_model").max_length
_API_KEY_MAX_LENGTH = 4096
_url_validator = URLValidator(schemes=["http", "https"])


def external_base_url_clean(base_url: str) -> str:
    """An http(s) base URL without a trailing slash, e.g. ``https://api.example.com/v1``; or ModelError."""
    url = (base_url or "").strip().rstrip("/")
    if not url:
        raise ModelError("'endpoint' (the upstream's OpenAI base URL, e.g. https://api.example.com/v1) is required")
    if len(url) > _BASE_URL_MAX_LENGTH:
        raise ModelError(f"'endpoint' is longer than {_BASE_URL_MAX_LENGTH} characters")
    try:
        _url_validator(url)
    except ValidationError:
        raise ModelError(f"'endpoint' must be an http:// or https:// URL, got {base_url!r}") from None
    parts = urlsplit(url)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ModelError("'endpoint' must not carry a query, a fragment or credentials; put the key in 'api_key'")
    return url


def _upstream_model_clean(upstream_model: str) -> str:
    name = (upstream_model or "").strip()
    if not name or len(name) > _UPSTREAM_MODEL_MAX_LENGTH:
        raise ModelError(f"'upstream_model' must be 1-{_UPSTREAM_MODEL_MAX_LENGTH} characters")
    return name


def _api_key_clean(api_key: str) -> str:
    if not isinstance(api_key, str) or len(api_key) > _API_KEY_MAX_LENGTH or api_key != api_key.strip():
        raise ModelError(f"'api_key' must be a string of at most {_API_KEY_MAX_LENGTH} characters, "
                         "without surrounding spaces")
    return api_key


def model_register_external(*, name: str, base_url: str, upstream_model: str | None = None, api_key: str = "",
                            is_active: bool = True, created_by=None) -> RegisteredModel:
    """Register ``name`` as a model served by the OpenAI-compatible server at ``base_url``.

    ``upstream_model`` is the name that server expects (default: ``name``); ``api_key`` is
    stored encrypted; an inactive model is registered but not served. Raises ModelError for
    invalid input, ModelConflict when ``name`` is taken.
    """
    model_id_check(name)
    url = external_base_url_clean(base_url)
    upstream = _upstream_model_clean(name if upstream_model is None else upstream_model)
    key = _api_key_clean(api_key)
    try:
        with transaction.atomic():
            model = RegisteredModel.objects.create(id=name, source=ModelSource.EXTERNAL, owned_by="external",
                                                   is_active=is_active, created_by=created_by)
            ExternalEndpoint.objects.create(model=model, base_url=url, upstream_model=upstream,
                                            api_key_encrypted=secret_encrypt(key))
    except IntegrityError as exc:
        raise ModelConflict(f"A model named {name!r} already exists") from exc
    return model


def model_update_external(*, model: RegisteredModel, base_url: str | None = None, upstream_model: str | None = None,
                          api_key: str | None = None, is_active: bool | None = None) -> RegisteredModel:
    """Change an external model's upstream; ``None`` leaves a field as it is, ``api_key=""`` removes the key."""
    if not model.is_external:
        raise ModelError(f"{model.id!r} is not an external model")
    endpoint = ExternalEndpoint.objects.get(model=model)
    if base_url is not None:
        endpoint.base_url = external_base_url_clean(base_url)
    if upstream_model is not None:
        endpoint.upstream_model = _upstream_model_clean(upstream_model)
    if api_key is not None:
        endpoint.api_key_encrypted = secret_encrypt(_api_key_clean(api_key))
    with transaction.atomic():
        endpoint.save()
        if is_active is not None:
            model.is_active = is_active
        model.save(update_fields=["is_active", "updated_at"])
    return model


def model_delete_external(*, model: RegisteredModel) -> None:
    """Unregister an external model (its endpoint and stored key go with it)."""
    if not model.is_external:
        raise ModelError(f"{model.id!r} is not an external model")
    model.delete()


@dataclass
class ExternalKeysReencrypted:
    """What ``external_keys_reencrypt`` did, by model id."""

    reencrypted: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def external_keys_reencrypt(*, previous_sources: Sequence[str],
                            endpoints: QuerySet | None = None) -> ExternalKeysReencrypted:
    """Make the stored upstream keys that were encrypted under one of ``previous_sources``
    readable under the current key.

    A key the current key already reads is not written. A key that none of them reads is left
    as it is, and logged. A key entered again while this runs is kept. ``endpoints`` are the
    rows to go through (default: all; a migration passes its historical model's).
    """
    rows = ExternalEndpoint.objects.all() if endpoints is None else endpoints
    done = ExternalKeysReencrypted()
    for model_id, token in rows.exclude(api_key_encrypted="").values_list("pk", "api_key_encrypted"):
        try:
            fresh = secret_reencrypt(token, previous_sources=previous_sources)
        except SecretUnreadable:
            logger.warning("The stored upstream API key of external model %r decrypts with no known key; "
                           "left as it is: enter it again", model_id)
            done.unreadable.append(model_id)
            continue
        if fresh != token and rows.filter(pk=model_id, api_key_encrypted=token).update(api_key_encrypted=fresh):
            done.reencrypted.append(model_id)
    if done.reencrypted:
        epoch_bump(EPOCH_MODELS)  # update() sends no post_save
        logger.info("Re-encrypted the stored upstream API keys of %s under the current key", ", ".join(done.reencrypted))
    return done
