"""Where SECRET_KEY comes from: DJANGO_SECRET_KEY, or one key per install in its data directory.

These tests use real files and real processes: several processes racing for the key file, the
Django processes ``make run`` starts, and ``python -m workers`` on a node with its own cache.
"""

from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from llmplatform.env import ImproperlyConfiguredEnv
from llmplatform.secret_key import (
    PUBLISHED_SECRET_KEYS,
    SECRET_KEY_FILE_NAME,
    SECRET_KEY_MIN_LENGTH,
    secret_key_load_or_create,
    secret_key_resolve,
)

ROOT = Path(__file__).resolve().parent.parent
RACERS = 8


def environment_without_a_secret(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in ("DJANGO_SECRET_KEY", "LLMP_SERVER_URL")}
    return {**env, "LLMP_DATA_DIR": str(data_dir), "LLMP_MODELS_DIR": str(data_dir / "models"), **extra}


def _race_for_the_key(path: str, start, results) -> None:
    start.wait()
    results.put(secret_key_load_or_create(Path(path)))


@pytest.fixture
def no_secret_in_the_environment(monkeypatch):
    monkeypatch.delenv("DJANGO_SECRET_KEY", raising=False)
    monkeypatch.delenv("LLMP_SERVER_URL", raising=False)


def test_a_fresh_install_makes_one_key_and_keeps_it_readable_only_by_its_owner(tmp_path):
    path = tmp_path / "data" / SECRET_KEY_FILE_NAME
    key = secret_key_load_or_create(path)
    assert len(key) >= SECRET_KEY_MIN_LENGTH
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == key
    assert secret_key_load_or_create(path) == key, "a second start made another key"
    assert [p.name for p in path.parent.iterdir()] == [SECRET_KEY_FILE_NAME], "a draft file was left behind"


def test_two_installs_never_get_the_same_key(tmp_path):
    first, second = (secret_key_load_or_create(tmp_path / install / SECRET_KEY_FILE_NAME) for install in ("a", "b"))
    assert first != second


def test_processes_starting_at_once_all_end_up_with_the_same_key(tmp_path):
    path = tmp_path / SECRET_KEY_FILE_NAME
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(RACERS), context.Queue()
    racers = [context.Process(target=_race_for_the_key, args=(str(path), start, results)) for _ in range(RACERS)]
    for racer in racers:
        racer.start()
    keys = [results.get(timeout=60) for _ in racers]
    for racer in racers:
        racer.join(timeout=30)
        assert racer.exitcode == 0
    assert set(keys) == {path.read_text().strip()}, f"{len(set(keys))} different keys"
    assert [p.name for p in tmp_path.iterdir()] == [SECRET_KEY_FILE_NAME], "a draft file was left behind"


def test_the_server_and_the_worker_that_make_run_starts_together_sign_with_one_key(tmp_path):
    data_dir = tmp_path / "data"
    print_key = "from django.conf import settings; print(settings.SECRET_KEY)"
    processes = [subprocess.Popen([sys.executable, "manage.py", "shell", "-c", print_key], cwd=ROOT,
                                  env=environment_without_a_secret(data_dir), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    keys = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        keys.append(out.strip().splitlines()[-1])
    assert keys[0] == keys[1] == (data_dir / SECRET_KEY_FILE_NAME).read_text().strip()
    assert keys[0] not in PUBLISHED_SECRET_KEYS


@pytest.mark.parametrize("content", ["", "\n", "too-short-to-be-a-key"])
def test_an_empty_or_short_key_file_stops_start_up_instead_of_being_replaced(tmp_path, content):
    path = tmp_path / SECRET_KEY_FILE_NAME
    path.write_text(content)
    with pytest.raises(ImproperlyConfiguredEnv, match=rf"key file {path} holds \d+ characters.*damaged"):
        secret_key_load_or_create(path)
    assert path.read_text() == content


def test_a_key_file_that_cannot_be_read_stops_start_up(tmp_path):
    path = tmp_path / SECRET_KEY_FILE_NAME
    path.mkdir()
    with pytest.raises(ImproperlyConfiguredEnv, match=rf"key file {path} cannot be read"):
        secret_key_load_or_create(path)
    assert path.is_dir()


def test_the_secret_from_the_environment_wins_and_no_key_file_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("DJANGO_SECRET_KEY", "x" * 64)
    assert secret_key_resolve(data_dir=tmp_path) == "x" * 64
    assert not (tmp_path / SECRET_KEY_FILE_NAME).exists()


@pytest.mark.parametrize("published", PUBLISHED_SECRET_KEYS)
def test_a_published_default_secret_is_refused(tmp_path, monkeypatch, published):
    monkeypatch.setenv("DJANGO_SECRET_KEY", published)
    with pytest.raises(ImproperlyConfiguredEnv, match="published default"):
        secret_key_resolve(data_dir=tmp_path)


def test_a_process_pulling_from_a_remote_server_never_makes_a_key_of_its_own(tmp_path, monkeypatch,
                                                                             no_secret_in_the_environment):
    monkeypatch.setenv("LLMP_SERVER_URL", "http://server.example:8000")
    with pytest.raises(ImproperlyConfiguredEnv, match="needs the server's DJANGO_SECRET_KEY"):
        secret_key_resolve(data_dir=tmp_path)
    assert not (tmp_path / SECRET_KEY_FILE_NAME).exists()


def test_a_worker_pulling_from_a_remote_server_refuses_to_start_without_the_shared_secret(tmp_path):
    data_dir = tmp_path / "data"
    env = environment_without_a_secret(data_dir, LLMP_SERVER_URL="http://server.example:8000")
    result = subprocess.run([sys.executable, "-m", "workers", "--node", "remote-1"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("python -m workers: LLMP_SERVER_URL is set but DJANGO_SECRET_KEY is not"), lines[0]
    assert not (data_dir / SECRET_KEY_FILE_NAME).exists()
