"""A node pulling a model's file from the server (the server never pushes).

Nodes with their own model cache (``LLMP_SERVER_URL`` set) fetch a missing file from the
server's blob endpoint into ``<models dir>/<file>.part``, resuming with HTTP Range after an
interruption, check its sha256 against the registry's, and only then rename it into place.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from workers.files import sha256_file

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


class PullError(Exception):
    pass


def _lock_for(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(str(path), threading.Lock())


def model_pull(*, url: str, dest: Path, size: int, sha256: str, timeout: float = 60.0,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Fetch ``url`` to ``dest`` (resuming a partial ``dest.part``), verified against ``sha256``; one pull per file."""
    with _lock_for(dest):
        if dest.is_file():
            return dest
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(2):
            have = part.stat().st_size if part.exists() else 0
            if size and have > size:
                part.unlink()
                have = 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            with httpx.stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as response:
                if response.status_code == 416:  # the part is already whole
                    pass
                elif response.status_code not in (200, 206):
                    raise PullError(f"the server answered {response.status_code} for {dest.name}: "
                                    f"{response.read()[:200].decode(errors='replace')}")
                else:
                    mode = "ab" if response.status_code == 206 else "wb"
                    done = have if mode == "ab" else 0
                    with open(part, mode) as handle:
                        for chunk in response.iter_bytes(CHUNK_BYTES):
                            handle.write(chunk)
                            done += len(chunk)
                            if progress is not None:
                                progress(done, size)
            if sha256_file(part) == sha256 or not sha256:
                os.replace(part, dest)
                logger.info("pulled %s (%d bytes) from the server", dest.name, dest.stat().st_size)
                return dest
            logger.warning("pulled %s does not match its sha256; fetching it again from the start", dest.name)
            part.unlink()
        raise PullError(f"{dest.name} did not match its sha256 twice")
