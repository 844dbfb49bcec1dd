"""Isolation for a test session, loaded as a pytest plugin (``-p tests.environment``) so that it
runs before pytest-django reads the settings: its own data directory, Redis database, key
prefix and queues, so a test run never meets a ``make run`` on the same machine."""

import os
import tempfile
import uuid

RUN = uuid.uuid4().hex[:8]

os.environ.setdefault("LLMP_DATA_DIR", tempfile.mkdtemp(prefix="llmp-test-"))
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ["LLMP_REDIS_PREFIX"] = f"llmptest-{RUN}"
os.environ.setdefault("LLMP_HEARTBEAT_INTERVAL", "1")
os.environ.setdefault("LLMP_N_CTX", "2048")
os.environ.setdefault("LLMP_UPLOAD_MAX_BYTES", str(150 * 1024 * 1024))  # the bundled model (98 MB) fits
os.environ.setdefault("LLMP_JOB_LEASE_SECONDS", "3")
os.environ.setdefault("LLMP_JOB_PROGRESS_INTERVAL", "0.2")
os.environ.setdefault("LLMP_BODY_RECEIVE_TIMEOUT", "5")  # a body that stalls fails its test in seconds
# Every test connects from 127.0.0.1: refused keys there must not lock the others out (tests/test_request_guard.py
# runs a server with a low limit of its own).
os.environ.setdefault("LLMP_AUTH_FAILURE_LIMIT", "1000000")
