from __future__ import annotations

from django.conf import settings

from apps.models.models import ModelSource, RegisteredModel
from workers.bundled import BUNDLED_FILE_NAME, bundled_model_path


def model_register_bundled() -> RegisteredModel:
    """Make sure the bundled SmolLM2 model is registered; idempotent and race-safe."""
    path = bundled_model_path()
    model, _ = RegisteredModel.objects.update_or_create(
        id=settings.LLMP_DEFAULT_MODEL_ID,
        defaults={
            "source": ModelSource.BUNDLED,
            "file_name": BUNDLED_FILE_NAME,
            "size_bytes": path.stat().st_size,
        },
    )
    return model
