"""Small file helpers shared by downloads, pulls and the model registry."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

HASH_CHUNK_BYTES = 4 << 20


def sha256_file(path: Path, *, progress: Callable[[int], None] | None = None) -> str:
    """The hex sha256 of a file's content; ``progress(bytes_read)`` after each chunk."""
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done)
    return digest.hexdigest()
