from django import forms
from django.contrib import admin, messages

from apps.models.models import ExternalEndpoint, ModelCopy, RegisteredModel
from apps.models.secrets import secret_hint
from apps.models.services import (
    ModelError,
    external_base_url_clean,
    model_delete_external,
    model_id_check,
    model_load_failure_clear,
    model_register_external,
    model_update_external,
)


@admin.register(RegisteredModel)
class RegisteredModelAdmin(admin.ModelAdmin):
    list_display = ("id", "source", "file_name", "size_bytes", "is_active", "created_at")
    list_filter = ("source", "is_active")
    search_fields = ("id", "file_name")


class LoadFailedFilter(admin.SimpleListFilter):
    title = "load failed"
    parameter_name = "load_failed"

    def lookups(self, request, model_admin):
        return [("yes", "Failed to load"), ("no", "Loads")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(load_failed_at__isnull=self.value() == "no")
        return queryset


@admin.register(ModelCopy)
class ModelCopyAdmin(admin.ModelAdmin):
    """Which node holds which model's file, and where a model failed to load (the gateway avoids those)."""

    list_display = ("model", "node", "size_bytes", "created_at", "load_failed_at", "load_error")
    list_filter = (LoadFailedFilter, "node")
    search_fields = ("model__id", "node__name")
    readonly_fields = ("model", "node", "size_bytes", "created_at", "load_failed_at", "load_error", "load_failed_file")
    actions = ["clear_load_failure"]

    def has_add_permission(self, request) -> bool:
        return False  # a node's worker records its copies

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.action(description="Clear the load-failure mark: the node tries the model again")
    def clear_load_failure(self, request, queryset):
        cleared = []
        for copy in queryset.filter(load_failed_at__isnull=False).select_related("node"):
            cleared += model_load_failure_clear(model_id=copy.model_id, node_name=copy.node.name)
        self.message_user(request, f"Cleared {len(cleared)} load-failure mark(s).", messages.SUCCESS)


class ExternalEndpointForm(forms.ModelForm):
    """The upstream API key is write-only here: typed in, encrypted on save, never rendered back."""

    name = forms.CharField(max_length=128, help_text="The model id clients put in 'model'; it cannot change later.")
    base_url = forms.URLField(max_length=500, assume_scheme="https",
                              help_text="The upstream's OpenAI base URL, e.g. https://api.example.com/v1")
    api_key = forms.CharField(required=False, strip=False, widget=forms.PasswordInput(render_value=False),
                              help_text="The upstream's API key, stored encrypted. Leave empty to keep the current one.")
    clear_api_key = forms.BooleanField(required=False, label="Remove the stored API key")

    class Meta:
        model = ExternalEndpoint
        fields = ["base_url", "upstream_model"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields.pop("name", None)
        else:
            self.fields["upstream_model"].required = False
            self.fields["upstream_model"].help_text += " (default: the name)"

    def clean(self):
        cleaned = super().clean()
        try:
            if "name" in self.fields and cleaned.get("name"):
                model_id_check(cleaned["name"])
            if cleaned.get("base_url"):
                cleaned["base_url"] = external_base_url_clean(cleaned["base_url"])
        except ModelError as error:
            raise forms.ValidationError(str(error)) from error
        return cleaned


@admin.register(ExternalEndpoint)
class ExternalEndpointAdmin(admin.ModelAdmin):
    form = ExternalEndpointForm
    list_display = ("model", "base_url", "upstream_model", "api_key_hint")
    search_fields = ("model__id", "base_url", "upstream_model")

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["name", "base_url", "upstream_model", "api_key"]
        return ["model", "base_url", "upstream_model", "api_key", "clear_api_key", "api_key_hint"]

    def get_readonly_fields(self, request, obj=None):
        return ["model", "api_key_hint"] if obj is not None else []

    @admin.display(description="API key")
    def api_key_hint(self, obj: ExternalEndpoint) -> str:
        if not obj.api_key_encrypted:
            return "not set"
        hint = secret_hint(obj.api_key_encrypted)
        if hint is None:
            return "set, but unreadable with this server's key: enter it again"
        return f"set (…{hint})" if hint else "set"

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        if change:
            api_key = data["api_key"] or ("" if data.get("clear_api_key") else None)
            model_update_external(model=obj.model, base_url=obj.base_url, upstream_model=obj.upstream_model,
                                  api_key=api_key)
            obj.refresh_from_db()
            return
        obj.model = model_register_external(name=data["name"], base_url=obj.base_url,
                                            upstream_model=obj.upstream_model or None, api_key=data["api_key"],
                                            created_by=request.user)
        obj.refresh_from_db()

    def delete_model(self, request, obj):
        model_delete_external(model=obj.model)

    def delete_queryset(self, request, queryset):
        for endpoint in queryset.select_related("model"):
            model_delete_external(model=endpoint.model)
