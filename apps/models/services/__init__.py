"""Every write of the model registry; import from here (``from apps.models.services import ...``).

``registry``: GGUF files registered and deleted, node copies, blob tokens, and ``ModelError``;
``lifecycle``: the jobs that bring models in (download, convert, quantize); ``external``: models
served by another OpenAI-compatible server; ``uploads``: an uploaded GGUF file received to disk.
"""

from apps.models.services.external import (
    ExternalKeysReencrypted,
    external_base_url_clean,
    external_keys_reencrypt,
    model_delete_external,
    model_register_external,
    model_update_external,
)
from apps.models.services.lifecycle import (
    CONVERT_OUTTYPES,
    model_convert_start,
    model_download_start,
    model_quantize_start,
)
from apps.models.services.registry import (
    GGUF_SUFFIX,
    ModelConflict,
    ModelError,
    blob_token,
    blob_token_check,
    model_copy_delete,
    model_copy_record,
    model_copy_record_seen,
    model_delete,
    model_file_check,
    model_file_name_clean,
    model_id_check,
    model_id_for_file,
    model_load_failure_clear,
    model_load_failure_record,
    model_path,
    model_register_bundled,
    model_register_file,
    model_register_upload,
    model_store_sync,
    model_unload_everywhere,
)
from apps.models.services.uploads import FILE_FIELD, GGUFUploadHandler, ReceivedFile

__all__ = [
    "CONVERT_OUTTYPES", "FILE_FIELD", "GGUF_SUFFIX", "ExternalKeysReencrypted", "GGUFUploadHandler", "ModelConflict",
    "ModelError", "ReceivedFile", "blob_token", "blob_token_check", "external_base_url_clean",
    "external_keys_reencrypt", "model_convert_start", "model_copy_delete", "model_copy_record",
    "model_copy_record_seen", "model_delete",
    "model_delete_external", "model_download_start", "model_file_check", "model_file_name_clean", "model_id_check",
    "model_id_for_file", "model_load_failure_clear", "model_load_failure_record", "model_path", "model_quantize_start",
    "model_register_bundled", "model_register_external", "model_register_file",
    "model_register_upload", "model_store_sync", "model_unload_everywhere", "model_update_external",
]
