"""Upstream API keys that an older install stored under a published default SECRET_KEY are
re-encrypted under this install's key, so they stay readable once SECRET_KEY is a real secret.

Nothing to undo: going back would put them under a key anyone can read them with.
"""

from django.db import migrations


def reencrypt_off_published_secrets(apps, schema_editor):
    from apps.models.services import external_keys_reencrypt
    from apps.models.secrets import secret_legacy_sources

    sources = secret_legacy_sources()
    if sources:
        endpoints = apps.get_model("llm_models", "ExternalEndpoint").objects.using(schema_editor.connection.alias)
        external_keys_reencrypt(previous_sources=sources, endpoints=endpoints.all())


class Migration(migrations.Migration):

    dependencies = [
        ("llm_models", "0002_registry_metadata_copies_external"),
    ]

    operations = [
        migrations.RunPython(reencrypt_off_published_secrets, migrations.RunPython.noop),
    ]
