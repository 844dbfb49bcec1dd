from django.conf import settings
from django.db import models

from workers.messages import ModelRef


class ModelSource(models.TextChoices):
    BUNDLED = "bundled", "Bundled with the platform"
    UPLOAD = "upload", "Uploaded"
    HUGGINGFACE = "huggingface", "Hugging Face"
    CONVERSION = "conversion", "Converted"
    EXTERNAL = "external", "External OpenAI-compatible API"


class RegisteredModel(models.Model):
    """A model the gateway can route to, under the id clients put in ``model``.

    A local model is one complete, verified GGUF file: the row exists only once the file does.
    Its facts come from the file's GGUF header. An external model forwards to another
    OpenAI-compatible server (see ``ExternalEndpoint``).
    """

    id = models.SlugField(primary_key=True, max_length=128)
    source = models.CharField(max_length=16, choices=ModelSource.choices)
    # File name inside the models directory (for bundled models: inside the package).
    file_name = models.CharField(max_length=255, blank=True)
    size_bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    owned_by = models.CharField(max_length=64, default="llmplatform")
    is_active = models.BooleanField(default=True)
    # From the GGUF header.
    architecture = models.CharField(max_length=64, blank=True)
    parameter_count = models.BigIntegerField(null=True, blank=True)
    context_length = models.PositiveIntegerField(null=True, blank=True)
    file_type = models.CharField(max_length=32, blank=True,
                                 help_text="Quantization, as llama.cpp names it (Q4_K_M, F16, ...)")
    chat_template = models.TextField(blank=True)
    # block_count, head_count, head_count_kv, embedding_length, key_length, value_length, ...
    metadata = models.JSONField(default=dict, blank=True)
    # Where it came from: a Hugging Face repo + file, or the model it was converted/quantized from.
    hf_repo = models.CharField(max_length=255, blank=True)
    hf_filename = models.CharField(max_length=255, blank=True)
    hf_revision = models.CharField(max_length=64, blank=True)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="derived")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.id

    @property
    def is_external(self) -> bool:
        return self.source == ModelSource.EXTERNAL

    def worker_spec(self) -> ModelRef:
        """What a worker needs to find, fetch and load this model (the runtime's typed reference)."""
        return ModelRef(id=self.id, source=str(self.source), file_name=self.file_name,
                        size_bytes=self.size_bytes, sha256=self.sha256)


class ModelCopy(models.Model):
    """A node holds a complete, verified copy of a model's file in its models directory.

    When the model failed to load there (llama.cpp refused the file, or the runner died while
    loading it), the copy is marked failed: the gateway sends the model to other nodes, and the
    node does not try it again until the file changes or an operator clears the mark.
    """

    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="copies")
    node = models.ForeignKey("nodes.Node", on_delete=models.CASCADE, related_name="model_copies")
    size_bytes = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    load_failed_at = models.DateTimeField(null=True, blank=True, help_text="When the model last failed to load on "
                                          "this node; empty: it loads, or has not been tried since the mark was cleared.")
    load_error = models.TextField(blank=True, help_text="Why it failed to load (no server paths).")
    load_failed_file = models.JSONField(default=dict, blank=True, help_text="The file that failed: size, mtime_ns "
                                        "and sha256. The node tries the model again once its file differs.")

    class Meta:
        ordering = ["model_id", "node_id"]
        constraints = [models.UniqueConstraint(fields=["model", "node"], name="model_copy_unique")]

    def __str__(self) -> str:
        return f"{self.model_id} on {self.node_id}"


class ExternalEndpoint(models.Model):
    """Where an external model's requests go: another OpenAI-compatible server.

    The upstream API key is stored encrypted (``apps.models.secrets``), never in plain text.
    """

    model = models.OneToOneField(RegisteredModel, on_delete=models.CASCADE, primary_key=True,
                                 related_name="endpoint")
    base_url = models.URLField(max_length=500, help_text="The upstream's OpenAI base URL, e.g. https://api.example.com/v1")
    upstream_model = models.CharField(max_length=255, help_text="The model name the upstream expects")
    api_key_encrypted = models.TextField(blank=True)

    def __str__(self) -> str:
        return f"{self.model_id} -> {self.base_url}"
