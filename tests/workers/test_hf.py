"""workers.hf against the fake hub, through the real huggingface_hub code path.

The fake hub (tests/fakehub.py) is the only double: it speaks the Hub's HTTP protocol on
127.0.0.1 and ``HF_ENDPOINT`` points at it, as it would point at a mirror.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import pytest

from llmplatform import devstack
from tests.fakehub import FakeFile, FakeHub, FakeRepo
from workers import hf
from workers.bundled import bundled_model_path
from workers.files import sha256_file

SMOL = "llmp-test/SmolLM2-135M-Instruct-GGUF"
PRIVATE = "llmp-test/private-gguf"
GATED = "llmp-test/gated-gguf"
OTHER = "llmp-test/other-smollm2-gguf"
HUGE = "llmp-test/huge-gguf"
READER_TOKEN = "hf_reader_token_for_tests"
ROOT = Path(__file__).resolve().parents[2]
MB = 1_000_000


@pytest.fixture(scope="module")
def gguf() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="module")
def fake_hub_server(gguf):
    repos = [
        FakeRepo(SMOL, [FakeFile(gguf.name, source=gguf), FakeFile("README.md", data=b"# SmolLM2 GGUF\n"),
                        FakeFile("extra/Q8_0/smol-Q8_0.gguf", data=b"GGUF" + bytes(60))],
                 downloads=5000, tags=["llama", "text-generation"]),
        FakeRepo(OTHER, [FakeFile("smol.F16.gguf", data=b"GGUF" + bytes(10))], downloads=50),
        FakeRepo("llmp-test/smollm2-safetensors", [FakeFile("model.safetensors", data=bytes(100))], downloads=9000),
        FakeRepo(PRIVATE, [FakeFile("tiny.Q4_K_M.gguf", data=os.urandom(300_000))], token=READER_TOKEN),
        FakeRepo(GATED, [FakeFile("tiny.gguf", data=os.urandom(1000))], token=READER_TOKEN, gated=True),
        FakeRepo(HUGE, [FakeFile("enormous.gguf", zeros=2**60)]),
    ]
    with FakeHub(repos) as hub:
        yield hub


@pytest.fixture
def fake_hub(fake_hub_server, monkeypatch) -> FakeHub:
    """The fake hub as HF_ENDPOINT, with no token in the environment and an empty request record."""
    monkeypatch.setenv("HF_ENDPOINT", fake_hub_server.endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    fake_hub_server.clear_requests()
    fake_hub_server.throttle_bps = None
    fake_hub_server.drop_after_bytes = None
    yield fake_hub_server
    fake_hub_server.throttle_bps = None
    fake_hub_server.drop_after_bytes = None


def partial_files(dest: Path) -> list[Path]:
    return sorted((dest / hf.PARTIAL_DIR_NAME).glob("*.incomplete"))


def partial_size(dest: Path) -> int:
    files = partial_files(dest)
    return files[0].stat().st_size if files else 0


# --- listing and search --------------------------------------------------------------------------

def test_it_lists_a_repos_files_with_sizes_gguf_first_and_names_the_quantization(fake_hub, gguf):
    files = hf.hf_repo_files(repo_id=SMOL)

    assert [f["path"] for f in files] == [gguf.name, "extra/Q8_0/smol-Q8_0.gguf", "README.md"]
    model = files[0]
    assert model["size"] == gguf.stat().st_size
    assert model["is_gguf"] and model["quantization"] == "Q4_1"
    assert model["sha256"] == sha256_file(gguf)
    assert files[1]["quantization"] == "Q8_0"
    assert files[2] == {"path": "README.md", "size": 15, "is_gguf": False, "quantization": None, "sha256": None}


def test_it_searches_gguf_repos_by_name_most_downloaded_first(fake_hub):
    found = hf.hf_search(query="smollm2")

    assert [m["id"] for m in found] == [SMOL, OTHER]  # not the safetensors repo
    assert found[0]["downloads"] == 5000 and found[0]["is_gguf"] and "llama" in found[0]["tags"]
    assert [m["id"] for m in hf.hf_search(query="smollm2", limit=1)] == [SMOL]
    assert "llmp-test/smollm2-safetensors" in [m["id"] for m in hf.hf_search(query="smollm2", gguf_only=False)]


def test_search_shows_a_private_repo_only_to_its_token(fake_hub):
    assert hf.hf_search(query="private") == []
    assert [m["id"] for m in hf.hf_search(query="private", token=READER_TOKEN)] == [PRIVATE]


# --- download ------------------------------------------------------------------------------------

def test_it_downloads_a_gguf_with_monotonic_progress_ending_at_the_total_and_the_hubs_sha256(fake_hub, gguf, tmp_path):
    final = tmp_path / gguf.name
    events, final_seen = [], []
    fake_hub.throttle_bps = 200 * MB  # half a second, so progress has several steps

    def progress(done, total):
        events.append((done, total))
        final_seen.append(final.exists())

    downloaded = hf.hf_download(repo_id=SMOL, filename=gguf.name, dest_dir=tmp_path, progress=progress,
                                report_interval=0.05)

    total = gguf.stat().st_size
    assert downloaded.path == final
    assert downloaded.sha256 == sha256_file(final) == sha256_file(gguf)  # the digest it checked is the file's
    assert len(events) >= 4
    assert all(t == total for _, t in events)
    assert [d for d, _ in events] == sorted(d for d, _ in events)
    assert events[0][0] == 0 and events[-1][0] == total
    assert not any(final_seen[:-1])  # only the last report comes after the file is in place
    assert not (tmp_path / hf.PARTIAL_DIR_NAME).exists()


def test_a_cancelled_download_keeps_its_partial_file_and_resumes_it_with_a_range_request(fake_hub, gguf, tmp_path):
    fake_hub.throttle_bps = 50 * MB
    seen = []

    with pytest.raises(hf.DownloadCancelled):
        hf.hf_download(repo_id=SMOL, filename=gguf.name, dest_dir=tmp_path, report_interval=0.02,
                       progress=lambda done, total: seen.append(done), should_cancel=lambda: seen[-1] >= 10 * MB)

    kept = partial_size(tmp_path)
    assert 10 * MB <= kept < gguf.stat().st_size
    assert not (tmp_path / gguf.name).exists()

    fake_hub.throttle_bps = None
    fake_hub.clear_requests()
    resumed = []
    downloaded = hf.hf_download(repo_id=SMOL, filename=gguf.name, dest_dir=tmp_path,
                                progress=lambda done, total: resumed.append(done))

    gets = fake_hub.file_requests(SMOL, gguf.name)
    assert len(gets) == 1 and gets[0].headers["range"] == f"bytes={kept}-" and gets[0].status == 206
    assert resumed[0] == kept
    assert downloaded.sha256 == sha256_file(downloaded.path) == sha256_file(gguf)
    assert partial_files(tmp_path) == []


def test_a_download_killed_with_sigkill_resumes_from_its_partial_file(fake_hub, gguf, tmp_path):
    fake_hub.throttle_bps = 20 * MB
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from pathlib import Path
        from workers import hf
        hf.hf_download(repo_id={SMOL!r}, filename={gguf.name!r}, dest_dir=Path({str(tmp_path)!r}))
    """)], cwd=ROOT, env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    try:
        devstack.wait_until(lambda: partial_size(tmp_path) >= 8 * MB, timeout=20, interval=0.02,
                            what="the child's partial file to pass 8 MB")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL

    kept = partial_size(tmp_path)
    assert 8 * MB <= kept < gguf.stat().st_size
    assert not (tmp_path / gguf.name).exists()

    fake_hub.throttle_bps = None
    fake_hub.clear_requests()
    downloaded = hf.hf_download(repo_id=SMOL, filename=gguf.name, dest_dir=tmp_path)

    gets = fake_hub.file_requests(SMOL, gguf.name)
    assert [g.range_start for g in gets] == [kept]
    assert downloaded.sha256 == sha256_file(downloaded.path) == sha256_file(gguf)


def test_a_connection_dropped_mid_download_is_resumed_within_the_same_call(fake_hub, gguf, tmp_path):
    fake_hub.drop_after_bytes = 40 * MB

    downloaded = hf.hf_download(repo_id=SMOL, filename=gguf.name, dest_dir=tmp_path)

    starts = [g.range_start for g in fake_hub.file_requests(SMOL, gguf.name)]
    assert starts == [None, 40 * MB, 80 * MB]
    assert downloaded.sha256 == sha256_file(downloaded.path) == sha256_file(gguf)


def test_a_file_already_complete_is_verified_and_not_downloaded_again(fake_hub, gguf, tmp_path):
    hf.hf_download(repo_id=SMOL, filename=gguf.name, dest_dir=tmp_path)
    fake_hub.clear_requests()
    events = []

    downloaded = hf.hf_download(repo_id=SMOL, filename=gguf.name, dest_dir=tmp_path,
                                progress=lambda *e: events.append(e))

    assert downloaded == hf.HfDownloaded(tmp_path / gguf.name, sha256_file(gguf))
    assert fake_hub.file_requests(SMOL, gguf.name) == []
    assert events == [(gguf.stat().st_size, gguf.stat().st_size)]


def test_a_cancel_that_comes_after_the_last_byte_does_not_undo_the_finished_download(fake_hub, tmp_path):
    seen = []

    downloaded = hf.hf_download(repo_id=OTHER, filename="smol.F16.gguf", dest_dir=tmp_path,
                                progress=lambda done, total: seen.append(done == total), should_cancel=lambda: seen[-1])

    assert downloaded.path.read_bytes() == b"GGUF" + bytes(10)
    assert seen[-1]


def test_a_second_download_of_the_same_file_is_refused_while_the_first_runs(fake_hub, gguf, tmp_path):
    fake_hub.throttle_bps = 20 * MB
    stop = threading.Event()
    outcome = []

    def first():
        try:
            hf.hf_download(repo_id=SMOL, filename=gguf.name, dest_dir=tmp_path, should_cancel=stop.is_set,
                           report_interval=0.02)
        except hf.DownloadCancelled as error:
            outcome.append(error)

    runner = threading.Thread(target=first)
    runner.start()
    try:
        devstack.wait_until(lambda: partial_size(tmp_path) > 0, timeout=20, interval=0.02,
                            what="the first download to start writing")
        held = partial_size(tmp_path)
        with pytest.raises(hf.HfDownloadBusy, match="already being downloaded"):
            hf.hf_download(repo_id=SMOL, filename=gguf.name, dest_dir=tmp_path)
        assert partial_size(tmp_path) >= held  # the refused call left the first one's partial file alone
    finally:
        stop.set()
        runner.join(timeout=20)
    assert len(outcome) == 1
    assert len(partial_files(tmp_path)) == 1 and not (tmp_path / gguf.name).exists()


def test_a_nested_file_lands_under_its_folder(fake_hub, tmp_path):
    downloaded = hf.hf_download(repo_id=SMOL, filename="extra/Q8_0/smol-Q8_0.gguf", dest_dir=tmp_path)

    assert downloaded.path == tmp_path / "extra/Q8_0/smol-Q8_0.gguf"
    assert downloaded.path.read_bytes() == b"GGUF" + bytes(60)


def test_a_file_outside_lfs_is_checked_by_its_size_and_comes_back_without_a_sha256(fake_hub, tmp_path):
    downloaded = hf.hf_download(repo_id=SMOL, filename="README.md", dest_dir=tmp_path)

    assert downloaded == hf.HfDownloaded(tmp_path / "README.md", None)
    assert downloaded.path.read_bytes() == b"# SmolLM2 GGUF\n"


def test_a_filename_that_climbs_out_of_the_destination_is_refused(fake_hub, tmp_path):
    with pytest.raises(hf.HfError, match="outside"):
        hf.hf_download(repo_id=SMOL, filename="../escape.gguf", dest_dir=tmp_path / "models")
    assert fake_hub.requests == []


# --- tokens --------------------------------------------------------------------------------------

def test_a_private_repo_without_a_token_is_access_denied_with_a_401(fake_hub, tmp_path):
    with pytest.raises(hf.HfAccessDenied, match="401.*HF_TOKEN"):
        hf.hf_download(repo_id=PRIVATE, filename="tiny.Q4_K_M.gguf", dest_dir=tmp_path)
    with pytest.raises(hf.HfAccessDenied):
        hf.hf_repo_files(repo_id=PRIVATE)
    assert fake_hub.requests[0].status == 401
    assert list(tmp_path.iterdir()) == []


def test_HF_TOKEN_from_the_environment_opens_a_private_repo(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", READER_TOKEN)

    downloaded = hf.hf_download(repo_id=PRIVATE, filename="tiny.Q4_K_M.gguf", dest_dir=tmp_path)

    assert downloaded.path.stat().st_size == 300_000
    assert [f["path"] for f in hf.hf_repo_files(repo_id=PRIVATE)] == ["tiny.Q4_K_M.gguf"]
    assert all(r.headers["authorization"] == f"Bearer {READER_TOKEN}" for r in fake_hub.requests)


def test_a_token_argument_wins_over_HF_TOKEN(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_someone_elses_token")

    downloaded = hf.hf_download(repo_id=PRIVATE, filename="tiny.Q4_K_M.gguf", dest_dir=tmp_path, token=READER_TOKEN)

    assert downloaded.path.stat().st_size == 300_000
    with pytest.raises(hf.HfAccessDenied, match="refused the token"):
        hf.hf_repo_files(repo_id=PRIVATE)


def test_a_gated_repo_without_access_says_it_is_gated(fake_hub, tmp_path):
    with pytest.raises(hf.HfAccessDenied, match="gated"):
        hf.hf_download(repo_id=GATED, filename="tiny.gguf", dest_dir=tmp_path)
    with pytest.raises(hf.HfAccessDenied, match="gated"):
        hf.hf_download(repo_id=GATED, filename="tiny.gguf", dest_dir=tmp_path, token="hf_not_granted")
    assert [r.status for r in fake_hub.requests] == [401, 403]
    assert hf.hf_download(repo_id=GATED, filename="tiny.gguf", dest_dir=tmp_path, token=READER_TOKEN).path.is_file()


# --- errors --------------------------------------------------------------------------------------

def test_a_missing_repo_file_or_revision_each_get_their_own_error_and_leave_nothing_on_disk(fake_hub, tmp_path):
    store = tmp_path / "store"
    with pytest.raises(hf.HfRepoNotFound, match="'llmp-test/nope' does not exist"):
        hf.hf_download(repo_id="llmp-test/nope", filename="sub/x.gguf", dest_dir=store)
    with pytest.raises(hf.HfRepoNotFound):
        hf.hf_repo_files(repo_id="llmp-test/nope")
    with pytest.raises(hf.HfFileNotFound, match="has no file 'nested/missing.gguf'"):
        hf.hf_download(repo_id=SMOL, filename="nested/missing.gguf", dest_dir=store)
    with pytest.raises(hf.HfRevisionNotFound, match="no revision 'v9'"):
        hf.hf_download(repo_id=SMOL, filename="README.md", dest_dir=store, revision="v9")
    with pytest.raises(hf.HfRevisionNotFound):
        hf.hf_repo_files(repo_id=SMOL, revision="v9")
    assert list(tmp_path.iterdir()) == []  # not even an empty directory


def test_an_unreachable_hub_is_a_network_error(fake_hub, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")

    with pytest.raises(hf.HfNetworkError, match=f"could not reach the Hugging Face Hub at http://127.0.0.1:{port}"):
        hf.hf_download(repo_id=SMOL, filename="README.md", dest_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_file_larger_than_the_free_disk_space_is_refused_before_any_byte_is_written(fake_hub, tmp_path):
    with pytest.raises(hf.InsufficientDiskSpace) as error:
        hf.hf_download(repo_id=HUGE, filename="enormous.gguf", dest_dir=tmp_path)

    assert error.value.needed == 2**60
    assert 0 < error.value.free < 2**60
    assert f"needs {2**60} more bytes" in str(error.value) and f"{error.value.free} bytes free" in str(error.value)
    assert fake_hub.file_requests(HUGE, "enormous.gguf") == []
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


# --- the fake hub as its own process (python -m tests.fakehub, as the README runs it) ------------

def test_the_standalone_fake_hub_serves_the_bundled_model_and_reports_its_requests(gguf, monkeypatch, tmp_path):
    port = devstack.free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = devstack.start("fakehub", ["-m", "tests.fakehub", "--port", str(port), "--throttle", "1000"],
                             env=devstack.child_env(), log_dir=tmp_path / "logs")
    try:
        devstack.wait_until(lambda: "fakehub listening on" in process.log(), timeout=30, what="the fake hub to listen",
                            processes=(process,))
        assert f"fakehub listening on {endpoint}" in process.log()
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        files = hf.hf_repo_files(repo_id="llmplatform/SmolLM2-135M-Instruct-GGUF")
        assert httpx.post(f"{endpoint}/_fakehub/throttle?bps=0").json() == {"throttle_bps": None}
        assert [(f["path"], f["size"], f["sha256"]) for f in files] == [
            (gguf.name, gguf.stat().st_size, sha256_file(gguf))]
        assert [r["path"].split("?")[0] for r in httpx.get(f"{endpoint}/_fakehub/requests").json()] == [
            "/api/models/llmplatform/SmolLM2-135M-Instruct-GGUF/tree/main"]
    finally:
        process.stop()
