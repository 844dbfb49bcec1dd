from __future__ import annotations

from django.db.models import QuerySet

from apps.models.models import RegisteredModel


def model_list_active() -> QuerySet[RegisteredModel]:
    return RegisteredModel.objects.filter(is_active=True)


async def model_get_active(*, model_id: str) -> RegisteredModel | None:
    return await RegisteredModel.objects.filter(id=model_id, is_active=True).afirst()
