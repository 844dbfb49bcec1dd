from django import forms
from django.contrib import admin

from apps.models.models import ExternalEndpoint, RegisteredModel
from apps.models.secrets import secret_hint
from apps.models.services import (
    ModelError,
    external_base_url_clean,
    model_delete_external,
    model_id_check,
    model_register_external,
    model_update_external,
)


@admin.register(RegisteredModel)
class RegisteredModelAdmin(admin.ModelAdmin):
    list_display = ("id", "source", "file_name", "size_bytes", "is_active", "created_at")
    list_filter = ("source", "is_active")
    search_fields = ("id", "file_name")


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
