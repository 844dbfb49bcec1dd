import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmplatform.settings")

app = Celery("llmplatform")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["apps.gateway", "apps.nodes", "apps.models", "node"])
