"""Receiving an uploaded GGUF file: streamed to disk chunk by chunk, hashed on the way, never whole in memory.

``GGUFUploadHandler`` writes the ``file`` part of a multipart body to
``MODELS_DIR/.uploads/<random>.part``, rejects a name that is not ``.gguf`` and a body that does
not start like a GGUF file on its first chunk, and stops past ``LLMP_UPLOAD_MAX_BYTES``. Any
failure removes the partial file: nothing of a failed upload stays on disk.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, SkipFile

from apps.models.services.registry import ModelError, model_file_name_clean

FILE_FIELD = "file"
MAGIC_BYTES = 8  # "GGUF" + version


class UploadRejected(ModelError):
    pass


class ReceivedFile:
    """What the handler leaves in ``request.FILES['file']``: a complete file on disk, not its bytes."""

    def __init__(self, *, name: str, path: Path, size: int, sha256: str) -> None:
        self.name, self.path, self.size, self.sha256 = name, path, size, sha256

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


class GGUFUploadHandler(FileUploadHandler):
    def __init__(self, request=None) -> None:
        super().__init__(request)
        self.part_path: Path | None = None
        self._handle = None
        self._digest = None
        self._size = 0
        self._head = b""
        self._clean_name = ""

    def new_file(self, field_name, file_name, *args, **kwargs) -> None:
        super().new_file(field_name, file_name, *args, **kwargs)
        if field_name != FILE_FIELD or self.part_path is not None:
            raise SkipFile()  # only one model file per request
        self._clean_name = model_file_name_clean(file_name)  # ModelError: not a .gguf name
        uploads = settings.MODELS_DIR / ".uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        self.part_path = uploads / f"{uuid.uuid4().hex}.part"
        self._handle = open(self.part_path, "wb")
        self._digest = hashlib.sha256()

    def receive_data_chunk(self, raw_data: bytes, start: int):
        if self._handle is None:
            return raw_data
        if len(self._head) < MAGIC_BYTES:
            self._head += raw_data[: MAGIC_BYTES - len(self._head)]
            if len(self._head) >= MAGIC_BYTES or not raw_data:
                self._check_head()
        self._size += len(raw_data)
        if self._size > settings.LLMP_UPLOAD_MAX_BYTES:
            self.discard()
            raise UploadRejected(f"File too large: the limit is {settings.LLMP_UPLOAD_MAX_BYTES} bytes "
                                 "(LLMP_UPLOAD_MAX_BYTES)", status=413)
        self._handle.write(raw_data)
        self._digest.update(raw_data)
        return None

    def _check_head(self) -> None:
        from workers.gguf import GGUFError, check_magic

        try:
            check_magic(self._head)
        except GGUFError as exc:
            self.discard()
            raise UploadRejected(f"Invalid GGUF file: {exc}") from exc

    def file_complete(self, file_size: int):
        if self._handle is None:
            return None
        if len(self._head) < MAGIC_BYTES:
            self._check_head()
        self._handle.close()
        self._handle = None
        return ReceivedFile(name=self._clean_name, path=self.part_path, size=self._size,
                            sha256=self._digest.hexdigest())

    def upload_interrupted(self) -> None:
        self.discard()

    def discard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self.part_path is not None:
            self.part_path.unlink(missing_ok=True)
