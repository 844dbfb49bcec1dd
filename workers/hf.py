"""The Hugging Face Hub for the workers: list a repo's files, search models, download one file.

Everything goes through ``huggingface_hub`` (its API client, its HTTP session, its error types), so
``HF_ENDPOINT`` (a mirror, or ``tests/fakehub.py``) and ``HF_TOKEN`` (or a saved ``hf auth login``)
apply as they do for any Hugging Face tool; a ``token`` argument wins over both. ``HF_ENDPOINT`` is
read at each call, not once at import.

Downloads resume. ``hf_hub_download`` in huggingface_hub 2.4 writes to a temporary file with a
per-process name and deletes it on failure, so a cancelled, crashed or killed download starts from
byte 0 again. ``hf_download`` does the library's own metadata call (``get_hf_file_metadata``: the
HEAD on ``/resolve/``, redirects, ``X-Linked-Size``/``X-Linked-Etag``) and then streams the file
with the library's HTTP session into ``DEST/.incomplete/<name>.<etag>.incomplete``. It continues
that file with a ``Range`` request after any interruption, whoever was interrupted, and moves it
into place only once it is whole and its sha256 matches the Hub's. Files stored with Xet are
fetched over plain HTTP from the same ``/resolve/`` URL, because only that path can resume
a partial file.

This module is plain Python with no ORM. It has no Django imports.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypedDict
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

from workers.files import sha256_file

PARTIAL_DIR_NAME = ".incomplete"
REPORT_INTERVAL_S = 0.25
# Back-off between attempts when the connection drops; the count resets whenever bytes arrive.
NETWORK_RETRY_WAITS_S = (1.0, 2.0, 4.0)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_QUANTIZATION = re.compile(r"(?i)(?<![A-Z0-9])(I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)(?![A-Z0-9])")


# --- errors -------------------------------------------------------------------------------------

class HfError(RuntimeError):
    """Something went wrong with the Hub; ``str(error)`` is a sentence a user can act on."""


class HfRepoNotFound(HfError):
    pass


class HfRevisionNotFound(HfError):
    pass


class HfFileNotFound(HfError):
    pass


class HfInvalidRequest(HfError):
    """The request itself is wrong: a repo id or revision the Hub's rules refuse, or a 4xx from the Hub."""


class HfAccessDenied(HfError):
    """401/403: the repo is private or gated, or the token was refused."""


class HfNetworkError(HfError):
    """The Hub could not be reached, answered 5xx/429, or the connection dropped too often."""


class HfIntegrityError(HfError):
    """The downloaded bytes do not match the Hub's size or sha256; the partial file was discarded."""


class HfDownloadBusy(HfError):
    """Another process is downloading the same file into the same directory right now."""


class InsufficientDiskSpace(HfError):
    def __init__(self, message: str, *, needed: int, free: int):
        super().__init__(message)
        self.needed, self.free = needed, free


class DownloadCancelled(HfError):
    """``should_cancel`` said stop. The partial file is kept, so a later call resumes it."""


# --- listing and search ------------------------------------------------------------------------

class HfRepoFile(TypedDict):
    path: str
    size: int
    is_gguf: bool
    quantization: str | None  # "Q4_K_M", "F16"..., read from the file name
    sha256: str | None  # for LFS files (every GGUF): the Hub's digest of the content


class HfModelSummary(TypedDict):
    id: str
    author: str | None
    downloads: int
    likes: int
    tags: list[str]
    is_gguf: bool
    private: bool
    gated: bool
    last_modified: str | None


def hf_repo_files(*, repo_id: str, revision: str | None = None, token: str | None = None) -> list[HfRepoFile]:
    """Every file of a model repo at ``revision`` (default: main), GGUF files first, then by path."""
    api = HfApi(endpoint=_endpoint())
    with _hub_errors(repo_id=repo_id, revision=revision):
        entries = list(api.list_repo_tree(repo_id, recursive=True, revision=revision, token=_token(token)))
    files = [
        HfRepoFile(
            path=entry.path,
            size=entry.size,
            is_gguf=entry.path.lower().endswith(".gguf"),
            quantization=gguf_quantization(entry.path) if entry.path.lower().endswith(".gguf") else None,
            sha256=entry.lfs.sha256 if entry.lfs else None,
        )
        for entry in entries
        if isinstance(entry, RepoFile)
    ]
    return sorted(files, key=lambda f: (not f["is_gguf"], f["path"]))


def hf_search(*, query: str, limit: int = 20, gguf_only: bool = True, token: str | None = None) -> list[HfModelSummary]:
    """Model repos whose id contains ``query``, most downloaded first (only GGUF repos unless told)."""
    api = HfApi(endpoint=_endpoint())
    with _hub_errors():
        models = list(api.list_models(search=query or None, filter="gguf" if gguf_only else None,
                                      sort="downloads", limit=limit, token=_token(token)))
    return [
        HfModelSummary(
            id=model.id,
            author=model.author,
            downloads=model.downloads or 0,
            likes=model.likes or 0,
            tags=list(model.tags or []),
            is_gguf="gguf" in (model.tags or []),
            private=bool(model.private),
            gated=bool(model.gated),
            last_modified=model.last_modified.isoformat() if model.last_modified else None,
        )
        for model in models
    ]


def gguf_quantization(filename: str) -> str | None:
    """The quantization a GGUF file name announces (``model.Q4_K_M.gguf`` → ``Q4_K_M``), if any."""
    match = _QUANTIZATION.search(Path(filename).name.removesuffix(".gguf"))
    return match.group(1).upper() if match else None


# --- download ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class HfDownloaded:
    """A file :func:`hf_download` put in place."""

    path: Path
    sha256: str | None  # the Hub's digest the content was checked against: set for LFS files (every GGUF)


def hf_download(
    *,
    repo_id: str,
    filename: str,
    dest_dir: Path,
    revision: str | None = None,
    token: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    report_interval: float = REPORT_INTERVAL_S,
) -> HfDownloaded:
    """Download one file of a model repo to ``dest_dir / filename``; return its path and verified sha256.

    Guarantees: the final path only ever holds a complete file whose size matches the Hub's
    and, for LFS files (every GGUF), whose sha256 matches too (that digest is returned, so no
    caller needs to hash the file again); bytes already in a partial file from an earlier
    attempt (cancelled, crashed, killed) are kept and the rest is fetched with a ``Range``
    request. A file already complete at the final path is verified and returned without
    downloading. The free disk space is checked before the first byte. Nothing is created
    under ``dest_dir`` unless the Hub knows the file.

    ``progress(done, total)`` is called with byte counts (``done`` includes resumed bytes;
    ``total`` is 0 if the Hub did not say) when the download starts, then at most every
    ``report_interval`` seconds, and once more at the end. ``should_cancel()`` is polled on the
    same rhythm; when it returns true, :class:`DownloadCancelled` is raised and the partial file
    stays for a later resume.
    """
    dest_dir = Path(dest_dir)
    final_path = _final_path(dest_dir, filename)
    endpoint = _endpoint()
    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    headers = build_hf_headers(token=_token(token))
    headers["Accept-Encoding"] = "identity"  # byte offsets must be offsets into the file itself

    with _hub_errors(repo_id=repo_id, filename=filename, revision=revision):
        metadata = get_hf_file_metadata(url, headers=headers, endpoint=endpoint)
    if metadata.commit_hash is None or metadata.etag is None:
        raise HfError(f"{endpoint} answered without the Hub's X-Repo-Commit/ETag headers; is HF_ENDPOINT a Hub?")
    size, etag = metadata.size, metadata.etag
    sha256 = etag if _SHA256.fullmatch(etag) else None
    if _origin(metadata.location) != _origin(url):
        headers.pop("authorization", None)  # a signed CDN URL: the token stays with the Hub

    reporter = _Reporter(progress, should_cancel, total=size or 0, interval=report_interval)
    if final_path.is_file() and _is_complete(final_path, size=size, sha256=sha256):
        reporter.report(final_path.stat().st_size, final=True)
        return HfDownloaded(final_path, sha256)

    partial_dir = dest_dir / PARTIAL_DIR_NAME
    partial_path = partial_dir / f"{_flat_name(filename)}.{etag}.incomplete"
    final_path.parent.mkdir(parents=True, exist_ok=True)  # under dest_dir, which it creates too
    have = partial_path.stat().st_size if partial_path.is_file() else 0
    if size is not None:
        _check_free_space(dest_dir, needed=max(size - have, 0), what=f"{repo_id}/{filename}")

    partial_dir.mkdir(exist_ok=True)
    with _locked_partial(partial_path, filename) as partial:
        _discard_other_versions(partial_dir, filename, keep=partial_path)
        done = partial.seek(0, os.SEEK_END)
        if size is not None and done > size:
            partial.truncate(0)
            done = 0
        reporter.report(done, force=True)
        with _hub_errors(repo_id=repo_id, filename=filename, revision=revision), _disk_errors(dest_dir, size):
            done = _fetch(metadata.location, headers, partial, done=done, size=size, reporter=reporter)
            partial.flush()
            os.fsync(partial.fileno())
        if size is not None and done != size:
            partial_path.unlink()
            raise HfIntegrityError(f"{repo_id}/{filename}: got {done} bytes, the Hub announced {size}; "
                                   "the partial file was discarded, try again")
        if sha256 is not None and sha256_file(partial_path) != sha256:
            partial_path.unlink()
            raise HfIntegrityError(f"{repo_id}/{filename}: the sha256 of the downloaded bytes does not match "
                                   "the Hub's; the partial file was discarded, try again")
        os.replace(partial_path, final_path)
        _fsync_dir(final_path.parent)
    with contextlib.suppress(OSError):
        partial_dir.rmdir()  # only when no other download left a partial file there
    reporter.report(done, final=True)  # the file is in place: too late to cancel
    return HfDownloaded(final_path, sha256)


# --- internals ---------------------------------------------------------------------------------

class _Reporter:
    """Rate-limits the progress and cancel callbacks, which may touch a database or Redis."""

    def __init__(self, progress, should_cancel, *, total: int, interval: float):
        self.progress, self.should_cancel, self.total, self.interval = progress, should_cancel, total, interval
        self._last = float("-inf")

    def report(self, done: int, *, force: bool = False, final: bool = False) -> None:
        now = time.monotonic()
        if not (force or final) and now - self._last < self.interval:
            return
        self._last = now
        if self.progress is not None:
            self.progress(done, self.total)
        if not final and self.should_cancel is not None and self.should_cancel():
            raise DownloadCancelled(f"download cancelled after {done} of {self.total or '?'} bytes")

    def wait(self, seconds: float) -> None:
        """Wait between two attempts, still honouring a cancel."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.should_cancel is not None and self.should_cancel():
                raise DownloadCancelled("download cancelled while waiting to reconnect")
            time.sleep(min(left, 0.2))


def _fetch(url: str, headers: dict[str, str], partial: BinaryIO, *, done: int, size: int | None,
           reporter: _Reporter) -> int:
    """Append the bytes from offset ``done`` to the end of the file at ``url``; return the new length."""
    failures = 0
    while size is None or done < size:
        request_headers = dict(headers)
        if done:
            request_headers["Range"] = f"bytes={done}-"
        started_at = done
        try:
            # The library retries 429/5xx answers; a dropped connection is ours to retry, from the new offset.
            with http_stream_backoff("GET", url, headers=request_headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
                                     follow_redirects=True, retry_on_exceptions=()) as response:
                if response.status_code == 416:  # the partial file is not a prefix of this file
                    partial.truncate(0)
                    partial.seek(0)
                    done = 0
                    continue
                hf_raise_for_status(response)
                if done and response.status_code == 200:  # the server ignored the Range header
                    partial.truncate(0)
                    partial.seek(0)
                    done = 0
                elif response.status_code == 206 and not response.headers.get("Content-Range", "").startswith(
                        f"bytes {done}-"):
                    raise HfNetworkError(f"the server answered a range other than bytes={done}-")
                for chunk in response.iter_bytes():  # as received, so a dropped connection loses nothing
                    partial.write(chunk)
                    done += len(chunk)
                    reporter.report(done)
            if size is None:
                return done
            if done < size:
                raise httpx2.RemoteProtocolError(f"the connection closed after {done} of {size} bytes")
        except httpx2.TransportError:
            failures = 0 if done > started_at else failures + 1
            if failures > len(NETWORK_RETRY_WAITS_S):
                raise
            reporter.wait(NETWORK_RETRY_WAITS_S[failures - 1] if failures else 0)
    return done


@contextlib.contextmanager
def _hub_errors(*, repo_id: str | None = None, filename: str | None = None,
                revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's and httpx's exceptions into ours, with a message a user can act on."""
    repo = f"Hugging Face repo {repo_id!r}" if repo_id else "the Hugging Face Hub"
    try:
        yield
    except HfError:
        raise
    except GatedRepoError as error:
        raise HfAccessDenied(f"{repo} is gated: accept its conditions on the Hub with your account, then use a "
                             "token of that account (HF_TOKEN)") from error
    except RepositoryNotFoundError as error:
        if error.response.status_code == 401:
            raise HfAccessDenied(f"{repo} refused access (401): it is private or gated and needs a token with access "
                                 "to it (HF_TOKEN), or it does not exist") from error
        raise HfRepoNotFound(f"{repo} does not exist (or the token has no access to it)") from error
    except RevisionNotFoundError as error:
        raise HfRevisionNotFound(f"{repo} has no revision {revision!r}") from error
    except RemoteEntryNotFoundError as error:
        where = f" at revision {revision!r}" if revision else ""
        raise HfFileNotFound(f"{repo} has no file {filename!r}{where}") from error
    except HfHubHTTPError as error:
        status = error.response.status_code
        if status in (401, 403):
            raise HfAccessDenied(f"{repo} refused the token ({status}): check HF_TOKEN or the token given") from error
        if status == 429 or status >= 500:
            raise HfNetworkError(f"the Hugging Face Hub is unavailable ({status}); try again later") from error
        raise HfInvalidRequest(f"the Hugging Face Hub refused the request ({status}): {error}") from error
    except HFValidationError as error:
        raise HfInvalidRequest(f"invalid request to the Hugging Face Hub: {error}") from error
    except httpx2.TransportError as error:
        raise HfNetworkError(f"could not reach the Hugging Face Hub at {_endpoint()}: {error}") from error


@contextlib.contextmanager
def _disk_errors(dest_dir: Path, size: int | None) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(dest_dir).free
        raise InsufficientDiskSpace(f"the disk holding {dest_dir} is full ({free} bytes free); the partial file is "
                                    "kept, free some space and try again", needed=size or 0, free=free) from error


def _check_free_space(dest_dir: Path, *, needed: int, what: str) -> None:
    free = shutil.disk_usage(dest_dir).free
    if needed > free:
        raise InsufficientDiskSpace(f"not enough disk space for {what}: it needs {needed} more bytes, "
                                    f"{dest_dir} has {free} bytes free", needed=needed, free=free)


@contextlib.contextmanager
def _locked_partial(path: Path, filename: str) -> Iterator[BinaryIO]:
    """The partial file, open for appending, locked against a second downloader (released on any exit)."""
    with open(path, "ab+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HfDownloadBusy(f"{filename} is already being downloaded into {path.parent.parent}") from None
        yield f


def _discard_other_versions(partial_dir: Path, filename: str, *, keep: Path) -> None:
    """Delete partial files of earlier versions of ``filename`` that no running download holds."""
    for stale in partial_dir.glob(f"{glob.escape(_flat_name(filename))}.*.incomplete"):
        if stale == keep:
            continue
        with open(stale, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a download is writing it
            stale.unlink()


def _is_complete(path: Path, *, size: int | None, sha256: str | None) -> bool:
    if size is not None and path.stat().st_size != size:
        return False
    return sha256 is None or sha256_file(path) == sha256


def _final_path(dest_dir: Path, filename: str) -> Path:
    final = (dest_dir / filename).resolve()
    if not final.is_relative_to(dest_dir.resolve()) or final == dest_dir.resolve():
        raise HfError(f"refusing to write {filename!r} outside {dest_dir}")
    return final


def _flat_name(filename: str) -> str:
    return filename.replace("/", "--")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _token(token: str | None) -> str | None:
    """The token argument, else HF_TOKEN; None lets huggingface_hub fall back to a saved login."""
    return token or os.environ.get("HF_TOKEN") or None


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port
