"""A local stand-in for the Hugging Face Hub, for tests and offline demos.

It speaks the part of the Hub's HTTP protocol that ``huggingface_hub`` uses to list, search and
download model repos, so the library's own code runs unchanged with ``HF_ENDPOINT`` pointed here:

* ``GET /api/models`` (``search``, ``author``, ``filter``, ``sort``, ``limit``),
* ``GET /api/models/{owner}/{name}`` and ``.../revision/{rev}`` (``blobs=true`` adds sizes and LFS data),
* ``GET /api/models/{owner}/{name}/tree/{rev}[/{path}]`` (``recursive``),
* ``HEAD``/``GET /{owner}/{name}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``,
  ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``Accept-Ranges`` and ``Range`` (206/416),
* the Hub's error headers (``X-Error-Code``: ``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``, ``GatedRepo``) and 401/403 for private or gated repos without the right token.

Extras that are not part of the Hub protocol live under ``/_fakehub/``:
``GET /_fakehub/requests`` (what was received, as JSON) and ``POST /_fakehub/throttle?bps=N``
(``bps=0`` lifts the throttle), so a test driving a separate worker process can use them too.

In a test, use :class:`FakeHub` as a context manager (the ``fake_hub`` fixtures in
``tests/workers/test_hf.py`` do). Standalone::

    python -m tests.fakehub --port 8765                       # serves the bundled SmolLM2 GGUF
    python -m tests.fakehub --port 0 --repo me/tiny=a.gguf,README.md --private me/tiny=hf_secret

It prints ``fakehub listening on http://HOST:PORT`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from workers.files import sha256_file

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".onnx")
LFS_MIN_SIZE = 10 * 1024 * 1024
_BLOCK = 64 * 1024
_CREATED_AT = "2025-01-01T00:00:00.000Z"


@dataclass
class FakeFile:
    """One file of a fake repo: its bytes come from a local file, from memory, or are zeros."""

    path: str
    source: Path | None = None
    data: bytes | None = None
    zeros: int | None = None
    lfs: bool | None = None
    size: int = field(init=False)
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.source, self.data, self.zeros)) != 1:
            raise ValueError("a FakeFile needs exactly one of source, data, zeros")
        if self.source is not None:
            self.source = Path(self.source)
            self.size = self.source.stat().st_size
            self.sha256 = _sha256_of_path(self.source, self.source.stat().st_mtime_ns, self.size)
        elif self.data is not None:
            self.size = len(self.data)
            self.sha256 = hashlib.sha256(self.data).hexdigest()
        else:
            # Too large to hash: the digest only has to be stable, never to verify a download.
            self.size = self.zeros
            self.sha256 = hashlib.sha256(f"zeros:{self.zeros}".encode()).hexdigest()
        if self.lfs is None:
            self.lfs = self.path.endswith(LFS_SUFFIXES) or self.size >= LFS_MIN_SIZE

    @property
    def lfs_pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    @property
    def blob_id(self) -> str:
        """The git blob id: of the LFS pointer for an LFS file, of the content otherwise."""
        if self.lfs:
            content = self.lfs_pointer
            return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        return hashlib.sha1(b"blob %d\0" % self.size + self.read(0, self.size)).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id

    def read(self, offset: int, length: int) -> bytes:
        if self.data is not None:
            return self.data[offset:offset + length]
        if self.zeros is not None:
            return bytes(min(length, self.size - offset))
        with open(self.source, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def tree_entry(self) -> dict:
        entry = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(self.lfs_pointer)}
        return entry


@functools.cache
def _sha256_of_path(path: Path, mtime_ns: int, size: int) -> str:
    """Hashed once per version of a file: several fake hubs in one test run serve the same model."""
    return sha256_file(path)


@dataclass
class FakeRepo:
    """A model repo. ``token`` makes it private (or gated, with ``gated=True``): only that bearer token reads it."""

    repo_id: str
    files: list[FakeFile]
    token: str | None = None
    gated: bool = False
    tags: list[str] = field(default_factory=list)
    downloads: int = 0
    likes: int = 0

    def __post_init__(self) -> None:
        if self.repo_id.count("/") != 1:
            raise ValueError(f"repo ids are owner/name, got {self.repo_id!r}")
        if self.gated and not self.token:
            raise ValueError("a gated repo needs the token that was granted access")
        if any(f.path.endswith(".gguf") for f in self.files) and "gguf" not in self.tags:
            self.tags = [*self.tags, "gguf"]

    @property
    def sha(self) -> str:
        """The commit id of the one revision this repo has."""
        return hashlib.sha1("\n".join([self.repo_id, *(f"{f.path}:{f.etag}" for f in self.files)]).encode()).hexdigest()

    @property
    def private(self) -> bool:
        return self.token is not None and not self.gated

    def file(self, path: str) -> FakeFile | None:
        return next((f for f in self.files if f.path == path), None)

    def summary(self) -> dict:
        owner = self.repo_id.split("/")[0]
        return {
            "_id": self.sha[:24], "id": self.repo_id, "modelId": self.repo_id, "author": owner,
            "sha": self.sha, "private": self.private, "gated": "auto" if self.gated else False, "disabled": False,
            "downloads": self.downloads, "likes": self.likes, "tags": self.tags,
            "library_name": "gguf" if "gguf" in self.tags else None, "pipeline_tag": "text-generation",
            "createdAt": _CREATED_AT, "lastModified": _CREATED_AT,
        }


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    status: int

    @property
    def range_start(self) -> int | None:
        """The first byte asked for by a ``Range: bytes=N-`` header, if any."""
        match = re.fullmatch(r"bytes=(\d+)-\d*", self.headers.get("range", ""))
        return int(match.group(1)) if match else None


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class FakeHub:
    """A threaded HTTP server holding fake repos; ``endpoint`` is what ``HF_ENDPOINT`` should be."""

    def __init__(self, repos: list[FakeRepo], *, host: str = "127.0.0.1", port: int = 0,
                 throttle_bps: int | None = None):
        self.repos = {repo.repo_id: repo for repo in repos}
        # Bytes per second each download is paced to; None: as fast as the loopback goes.
        self.throttle_bps = throttle_bps
        # Cut every file body after this many bytes, as a flaky network would; None: never.
        self.drop_after_bytes: int | None = None
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def file_requests(self, repo_id: str, filename: str, method: str = "GET") -> list[RecordedRequest]:
        """Requests received for one file's ``resolve`` URL, oldest first."""
        pattern = re.compile(rf"/{re.escape(repo_id)}/resolve/[^/]+/{re.escape(quote(filename))}")
        return [r for r in self.requests if r.method == method and pattern.fullmatch(r.path.split("?")[0])]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def start(self) -> FakeHub:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakehub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fakehub/1"

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    def log_message(self, format: str, *args) -> None:
        pass  # the request record is the log

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/_fakehub/throttle":
            bps = int(parse_qs(url.query).get("bps", ["0"])[0])
            self.hub.throttle_bps = bps or None
            self._send_json(200, {"throttle_bps": self.hub.throttle_bps})
        else:
            self._send_error(_HubError(404, "not found"))

    def _dispatch(self, *, head: bool) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        try:
            if url.path == "/_fakehub/requests":
                self._send_json(200, [{"method": r.method, "path": r.path, "headers": r.headers, "status": r.status}
                                      for r in self.hub.requests])
                return
            if url.path == "/api/models":
                self._send_json(200, self._search(query))
            elif url.path.startswith("/api/models/"):
                self._api_model(url.path.removeprefix("/api/models/"), query)
            elif "/resolve/" in url.path:
                self._resolve(url.path, head=head)
            else:
                raise _HubError(404, "Sorry, we can't find the page you are looking for.")
        except _HubError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-body

    def send_response(self, code: int, message: str | None = None) -> None:
        # Recorded as the status line goes out, so a test sees a request while its body still streams.
        if not self.path.startswith("/_fakehub/"):
            headers = {k.lower(): v for k, v in self.headers.items()}
            self.hub._record(RecordedRequest(self.command, self.path, headers, code))
        super().send_response(code, message)

    # --- the Hub's routes ---------------------------------------------------------------------

    def _search(self, query: dict[str, list[str]]) -> list[dict]:
        search = query.get("search", [""])[0].lower()
        author = query.get("author", [None])[0]
        wanted_tags = set(query.get("filter", []))
        repos = [repo for repo in self.hub.repos.values()
                 if search in repo.repo_id.lower()
                 and (author is None or repo.repo_id.split("/")[0] == author)
                 and wanted_tags <= set(repo.tags)
                 and (not repo.private or self._token() == repo.token)]
        sort = query.get("sort", [None])[0]
        if sort in ("downloads", "likes"):
            repos.sort(key=lambda repo: getattr(repo, sort), reverse=True)
        limit = int(query.get("limit", ["1000"])[0])
        return [repo.summary() for repo in repos[:limit]]

    def _api_model(self, rest: str, query: dict[str, list[str]]) -> None:
        parts = rest.split("/")
        repo = self._repo("/".join(parts[:2]))
        tail = parts[2:]
        if not tail or tail[0] == "revision":
            if tail:
                self._check_revision(repo, unquote("/".join(tail[1:])))
            info = repo.summary()
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            info["siblings"] = [self._sibling(f, blobs) for f in repo.files]
            info["usedStorage"] = sum(f.size for f in repo.files)
            self._send_json(200, info)
        elif tail[0] == "tree" and len(tail) >= 2:
            self._check_revision(repo, unquote(tail[1]))
            self._send_json(200, self._tree(repo, unquote("/".join(tail[2:])), query))
        else:
            raise _HubError(404, "Sorry, we can't find the page you are looking for.")

    @staticmethod
    def _sibling(f: FakeFile, blobs: bool) -> dict:
        sibling = {"rfilename": f.path}
        if blobs:
            sibling.update(size=f.size, blobId=f.blob_id)
            if f.lfs:
                sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": len(f.lfs_pointer)}
        return sibling

    @staticmethod
    def _tree(repo: FakeRepo, folder: str, query: dict[str, list[str]]) -> list[dict]:
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for f in repo.files:
            if not f.path.startswith(prefix):
                continue
            parts = f.path[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way to the file
                if not recursive and depth > 1:
                    break
                folder_path = prefix + "/".join(parts[:depth])
                oid = hashlib.sha1(f"tree:{repo.sha}:{folder_path}".encode()).hexdigest()
                entries.setdefault(folder_path, {"type": "directory", "oid": oid, "size": 0, "path": folder_path})
            if recursive or len(parts) == 1:
                entries[f.path] = f.tree_entry()
        if prefix and not entries:
            raise _HubError(404, f"{folder} does not exist on revision", code="EntryNotFound", commit=repo.sha)
        return sorted(entries.values(), key=lambda e: (e["type"] != "directory", e["path"]))

    def _resolve(self, path: str, *, head: bool) -> None:
        parts = path.lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            raise _HubError(404, "Sorry, we can't find the page you are looking for.")
        owner, name, _resolve, revision, *file_parts = parts
        repo = self._repo(f"{owner}/{name}")
        self._check_revision(repo, unquote(revision))
        filename = unquote("/".join(file_parts))
        f = repo.file(filename)
        if f is None:
            raise _HubError(404, "Entry not found", code="EntryNotFound", commit=repo.sha)

        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{f.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{Path(f.path).name}"',
        }
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
        start, end, status = 0, f.size - 1, 200
        requested = self.headers.get("Range")
        if requested and not head:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", requested.strip())
            if not match or int(match.group(1)) >= f.size:
                self._send_raw(416, {"Content-Range": f"bytes */{f.size}", **headers}, b"")
                return
            start = int(match.group(1))
            end = min(int(match.group(2)), f.size - 1) if match.group(2) else f.size - 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        headers["Content-Length"] = str(end - start + 1)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self._send_body(f, start, end - start + 1)

    # --- helpers ------------------------------------------------------------------------------

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _repo(self, repo_id: str) -> FakeRepo:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise _HubError(404, "Repository not found", code="RepoNotFound")
        token = self._token()
        if repo.token is not None and token != repo.token:
            if repo.gated:
                status = 401 if token is None else 403
                raise _HubError(status, f"Access to model {repo_id} is restricted and you are not in the authorized list.",
                                code="GatedRepo")
            if token is None:
                raise _HubError(401, "Invalid username or password.", code="RepoNotFound")
            raise _HubError(401, "Invalid credentials in Authorization header")
        return repo

    @staticmethod
    def _check_revision(repo: FakeRepo, revision: str) -> None:
        if revision not in ("main", repo.sha):
            raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def _send_body(self, f: FakeFile, offset: int, length: int) -> None:
        started, sent = time.monotonic(), 0
        cut = self.hub.drop_after_bytes
        if cut is not None and cut < length:
            length = cut
            self.close_connection = True  # the client gets fewer bytes than Content-Length said
        while sent < length:
            block = f.read(offset + sent, min(_BLOCK, length - sent))
            self.wfile.write(block)
            sent += len(block)
            bps = self.hub.throttle_bps
            if bps:
                ahead = sent / bps - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)  # pacing the sender is what a throttle is

    def _send_json(self, status: int, payload) -> None:
        self._send_raw(status, {"Content-Type": "application/json"}, json.dumps(payload).encode())

    def _send_error(self, error: _HubError) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": error.message}
        if error.code:
            headers["X-Error-Code"] = error.code
        if error.commit:
            headers["X-Repo-Commit"] = error.commit
        self._send_raw(error.status, headers, json.dumps({"error": error.message}).encode())

    def _send_raw(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _repos_from_args(args: argparse.Namespace) -> list[FakeRepo]:
    tokens = dict(spec.split("=", 1) for spec in args.private)
    gated = dict(spec.split("=", 1) for spec in args.gated)
    if not args.repo:
        from workers.bundled import bundled_model_path

        model = bundled_model_path()
        args.repo = [f"llmplatform/SmolLM2-135M-Instruct-GGUF={model}"]
    repos = []
    for spec in args.repo:
        repo_id, _, paths = spec.partition("=")
        files = [FakeFile(Path(p).name, source=Path(p)) for p in paths.split(",") if p]
        repos.append(FakeRepo(repo_id, files, token=tokens.get(repo_id) or gated.get(repo_id),
                              gated=repo_id in gated, downloads=100))
    return repos


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakehub", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed on start)")
    parser.add_argument("--repo", action="append", default=[], metavar="OWNER/NAME=PATH[,PATH...]",
                        help="a repo serving these local files (default: the bundled SmolLM2 GGUF)")
    parser.add_argument("--private", action="append", default=[], metavar="OWNER/NAME=TOKEN",
                        help="make a repo private, readable with this bearer token")
    parser.add_argument("--gated", action="append", default=[], metavar="OWNER/NAME=TOKEN",
                        help="make a repo gated, readable with this bearer token")
    parser.add_argument("--throttle", type=int, default=0, metavar="BYTES_PER_SECOND",
                        help="limit each download to this rate (0: no limit)")
    args = parser.parse_args(argv)
    hub = FakeHub(_repos_from_args(args), host=args.host, port=args.port, throttle_bps=args.throttle or None)
    for repo in hub.repos.values():
        print(f"  {repo.repo_id}: {', '.join(f.path for f in repo.files)}", file=sys.stderr)
    print(f"fakehub listening on {hub.endpoint}", flush=True)
    try:
        hub._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        hub._server.server_close()


if __name__ == "__main__":
    main()
