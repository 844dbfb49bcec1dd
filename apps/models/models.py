from django.db import models


class ModelSource(models.TextChoices):
    BUNDLED = "bundled", "Bundled with the platform"
    UPLOAD = "upload", "Uploaded"
    HUGGINGFACE = "huggingface", "Hugging Face"
    CONVERSION = "conversion", "Converted"


class RegisteredModel(models.Model):
    """A GGUF model the gateway can route to, under the id clients put in ``model``."""

    id = models.SlugField(primary_key=True, max_length=128)
    source = models.CharField(max_length=16, choices=ModelSource.choices)
    # File name inside the models directory (for bundled models: inside the package).
    file_name = models.CharField(max_length=255)
    size_bytes = models.BigIntegerField(default=0)
    owned_by = models.CharField(max_length=64, default="llmplatform")
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.id

    def worker_spec(self) -> dict:
        """What a worker needs to find and load this model; plain JSON values only."""
        return {"id": self.id, "source": self.source, "file_name": self.file_name}
