"""Fixtures that run the real platform: Redis, a Celery worker process, the ASGI server.

Each test session gets its own database (a fresh SQLite file, or a fresh PostgreSQL database
when DATABASE_URL names one), its own Redis key prefix and its own queues, so it never meets
a ``make run`` on the same machine. Tests run outside transactions, because the worker and
server processes must see what a test writes; each test makes its own uniquely named data.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from llmplatform import devstack
from tests.environment import RUN as _RUN


def _database_url(settings_dict: dict) -> str:
    if settings_dict["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{settings_dict['NAME']}"
    user = settings_dict.get("USER") or "postgres"
    password = f":{settings_dict['PASSWORD']}" if settings_dict.get("PASSWORD") else ""
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{settings_dict['NAME']}"


@pytest.fixture(scope="session")
def django_db_setup(django_db_blocker, tmp_path_factory):
    """A fresh, migrated database that the worker and server processes share with the tests."""
    from django.core.management import call_command
    from django.db import connections

    connection = connections["default"]
    created_pg = None
    if connection.vendor == "sqlite":
        connection.settings_dict["NAME"] = str(tmp_path_factory.mktemp("db") / "test.sqlite3")
    else:
        import psycopg

        created_pg = f"llmp_test_{_RUN}"
        admin_url = _database_url(connection.settings_dict)
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{created_pg}"')
        connection.settings_dict["NAME"] = created_pg
    connection.close()
    os.environ["DATABASE_URL"] = _database_url(connection.settings_dict)
    with django_db_blocker.unblock():
        call_command("migrate", verbosity=0)
    yield
    if created_pg:
        connection.close()
        base = dict(connection.settings_dict, NAME="postgres")
        with psycopg.connect(_database_url(base), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{created_pg}" WITH (FORCE)')


@pytest.fixture(autouse=True)
def _database(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        yield


@pytest.fixture(scope="session")
def platform(django_db_setup, tmp_path_factory) -> devstack.Stack:
    """One worker node and the ASGI server, as separate processes, ready to serve."""
    stack = devstack.stack_start(f"test-{_RUN}", env=devstack.child_env(),
                                 log_dir=Path(tmp_path_factory.mktemp("logs")))
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def api_key(django_db_setup, django_db_blocker) -> str:
    """The operator's key: a staff user's, since model, job, node and cache writes are for staff.
    What other callers may do is tests/test_permissions.py's subject."""
    from django.contrib.auth import get_user_model

    from apps.gateway.services import api_key_create

    with django_db_blocker.unblock():
        user = get_user_model().objects.create_user(f"client-{_RUN}", password=uuid.uuid4().hex, is_staff=True)
        _, raw_key = api_key_create(name="test session key", user=user)
    return raw_key


@pytest.fixture
def client(platform, api_key) -> openai.OpenAI:
    """The official OpenAI client, pointed at our gateway."""
    return openai.OpenAI(base_url=f"{platform.base_url}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture
def http(platform, api_key) -> httpx.Client:
    with httpx.Client(base_url=platform.base_url, headers={"Authorization": f"Bearer {api_key}"},
                      timeout=120) as session:
        yield session


@pytest.fixture
def model_id() -> str:
    from django.conf import settings

    return settings.LLMP_DEFAULT_MODEL_ID


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the platform processes' recent logs to a failing test's report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "platform" in getattr(item, "fixturenames", ()):
        platform = item.funcargs.get("platform")
        if platform is not None:
            for process in (platform.server, platform.worker):
                report.sections.append((f"{process.name} log (tail)", process.log()[-6000:]))
