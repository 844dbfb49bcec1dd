from django.db import models


class FitMeasurement(models.Model):
    """What a node's worker measured for one model: memory after loading it, speed when generating.

    One row per node and model; fit estimates for that pair use it instead of the model.
    """

    node = models.ForeignKey("nodes.Node", on_delete=models.CASCADE, related_name="fit_measurements")
    model_id = models.CharField(max_length=128, help_text="The registered model's id")
    # Largest resident-memory growth seen while loading one instance (weights, KV cache, buffers).
    memory_bytes = models.BigIntegerField(null=True, blank=True)
    # Decoding speed, averaged over the last generations (tps_samples of them, at most 20).
    tokens_per_second = models.FloatField(null=True, blank=True)
    tps_samples = models.PositiveIntegerField(default=0)
    measured_at = models.DateTimeField()

    class Meta:
        ordering = ["node_id", "model_id"]
        constraints = [models.UniqueConstraint(fields=["node", "model_id"], name="fit_measurement_unique")]

    def __str__(self) -> str:
        return f"{self.model_id} on {self.node_id}"
