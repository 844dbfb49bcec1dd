from rest_framework import serializers

from apps.jobs.models import Job


# A job as every API shows it: /api/v1/jobs/ and the model endpoints that start one (download, convert,
# quantize). It lives beside the app's selectors, not in its api/, because other apps' APIs return jobs too
# (and one app never imports another's api/: see pyproject.toml).
class JobSerializer(serializers.ModelSerializer):
    node = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    progress_fraction = serializers.FloatField(read_only=True, allow_null=True)
    events_url = serializers.SerializerMethodField()

    class Meta:
        model = Job
        fields = ["id", "kind", "status", "stage", "params", "node", "progress_done", "progress_total",
                  "progress_unit", "progress_fraction", "rate", "eta_seconds", "error", "log", "attempts",
                  "cancel_requested", "result_model", "created_by", "created_at", "started_at", "finished_at",
                  "updated_at", "events_url"]
        read_only_fields = fields

    def get_events_url(self, job: Job) -> str:
        return f"/api/v1/jobs/{job.pk}/events"
