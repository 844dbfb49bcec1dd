"""Settings for llmplatform, read from the environment with embedded defaults.

With no environment at all the platform runs on SQLite under ``./data``, Redis on
127.0.0.1:6379 and the bundled SmolLM2 model. ``.env.example`` lists every variable.
"""

from __future__ import annotations

from pathlib import Path

import dj_database_url

from llmplatform.env import (
    ImproperlyConfiguredEnv,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_path,
    env_str,
)
from llmplatform.secret_key import secret_key_resolve
from workers.protocol import TASK_JOB_REAP

BASE_DIR = Path(__file__).resolve().parent.parent

DATA_DIR = env_path("LLMP_DATA_DIR", BASE_DIR / "data")
MODELS_DIR = env_path("LLMP_MODELS_DIR", DATA_DIR / "models")
MODELS_DIR.mkdir(parents=True, exist_ok=True)

# DJANGO_SECRET_KEY, or this install's own random key in DATA_DIR/secret_key (made on first start).
SECRET_KEY = secret_key_resolve(data_dir=DATA_DIR)
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

# Behind a proxy that terminates TLS and sets X-Forwarded-Proto (nginx, Caddy, a load balancer):
# requests it marks https count as secure, cookies travel only over HTTPS, and plain-HTTP requests
# are redirected, except the health checks, which the container runtime calls over plain HTTP.
# HSTS is left to the proxy (security.W004 stays in `check --deploy`).
LLMP_TLS_PROXY = env_bool("LLMP_TLS_PROXY", False)
if LLMP_TLS_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = SECURE_SSL_REDIRECT = LLMP_TLS_PROXY
SECURE_REDIRECT_EXEMPT = [r"^health(/|$)"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "channels",
    "apps.nodes",
    "apps.models",
    "apps.gateway",
    "apps.jobs",
    "apps.fit",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "llmplatform.urls"
ASGI_APPLICATION = "llmplatform.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# SQLite under the data directory unless DATABASE_URL names another database
# (postgres://user@host:5432/name for a multi-node deployment).
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'llmplatform.sqlite3'}"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0, minimum=0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and env_bool("LLMP_DB_POOL", True):
    # Async views run their queries on a thread per request, so without a pool every request
    # would open a new PostgreSQL connection (a few ms of latency each time).
    if DATABASES["default"]["CONN_MAX_AGE"]:
        raise ImproperlyConfiguredEnv("DATABASE_CONN_MAX_AGE must be 0 while LLMP_DB_POOL is on")
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env_int("LLMP_DB_POOL_MIN", 2, minimum=0),
        "max_size": env_int("LLMP_DB_POOL_MAX", 20, minimum=1),
    }
elif DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the gateway read while a worker writes; the timeout rides out short locks. IMMEDIATE
    # transactions take the write lock when they begin, so a transaction that reads and then writes
    # (get_or_create, update_or_create) waits for that lock instead of failing at once with "database
    # is locked" when another process committed in between (SQLite cannot upgrade a stale read).
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 20, "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
         "transaction_mode": "IMMEDIATE"}
    )

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LLMP_LOG_LEVEL", "INFO")},
}

# --- Redis, Celery, Channels -------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")

CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = None  # results travel over per-request Redis streams, not Celery
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE = {
    "job-reap": {
        "task": TASK_JOB_REAP,
        "schedule": env_float("LLMP_JOB_REAP_INTERVAL", 10.0, minimum=1.0),
    },
    "request-log-prune": {
        "task": "apps.gateway.tasks.request_log_prune",
        "schedule": env_float("LLMP_REQUEST_LOG_PRUNE_INTERVAL", 3600.0, minimum=1.0),
    },
    "node-metrics-prune": {
        "task": "apps.nodes.tasks.node_metrics_prune",
        "schedule": env_float("LLMP_NODE_METRICS_PRUNE_INTERVAL", 600.0, minimum=1.0),
    },
}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": env_str("LLMP_REDIS_PREFIX", "llmp") + ":channels"},
    }
}

# --- Platform ----------------------------------------------------------------------------
# Prefix for every Redis key and queue the platform uses, so two installs can share one Redis.
LLMP_REDIS_PREFIX = env_str("LLMP_REDIS_PREFIX", "llmp")
CELERY_TASK_DEFAULT_QUEUE = env_str("LLMP_DEFAULT_QUEUE", f"{LLMP_REDIS_PREFIX}.default")
# Node status from the age of its last heartbeat: online up to LLMP_NODE_DEGRADED_SECONDS
# (default: three heartbeats), degraded up to LLMP_NODE_OFFLINE_SECONDS, offline after that.
# Degraded nodes get new requests only when no online node can take them; offline ones none,
# and their requests in flight fail with worker_lost.
LLMP_HEARTBEAT_INTERVAL = env_float("LLMP_HEARTBEAT_INTERVAL", 5.0, minimum=0.5)
LLMP_NODE_OFFLINE_SECONDS = env_float("LLMP_NODE_OFFLINE_SECONDS", 20.0, minimum=1.0)
LLMP_NODE_DEGRADED_SECONDS = env_float("LLMP_NODE_DEGRADED_SECONDS",
                                       min(3 * LLMP_HEARTBEAT_INTERVAL, LLMP_NODE_OFFLINE_SECONDS), minimum=0.5)
if not LLMP_HEARTBEAT_INTERVAL < LLMP_NODE_DEGRADED_SECONDS <= LLMP_NODE_OFFLINE_SECONDS:
    raise ImproperlyConfiguredEnv(
        "node thresholds must satisfy LLMP_HEARTBEAT_INTERVAL < LLMP_NODE_DEGRADED_SECONDS <= LLMP_NODE_OFFLINE_SECONDS, "
        f"got {LLMP_HEARTBEAT_INTERVAL} < {LLMP_NODE_DEGRADED_SECONDS} <= {LLMP_NODE_OFFLINE_SECONDS}")
# Hours of per-node metrics (one sample per heartbeat) kept for GET /api/v1/nodes/{node}/metrics/.
LLMP_NODE_METRICS_RETENTION_HOURS = env_float("LLMP_NODE_METRICS_RETENTION_HOURS", 24.0, minimum=0.1)
# How long the gateway waits for a worker to pick up a request before answering 503.
LLMP_QUEUE_TIMEOUT = env_float("LLMP_QUEUE_TIMEOUT", 30.0, minimum=0.1)
# Longest wait from pick-up to the first token: a free slot, loading the model, the prompt.
LLMP_FIRST_TOKEN_TIMEOUT = env_float("LLMP_FIRST_TOKEN_TIMEOUT", 600.0, minimum=1.0)
# Longest silence between two events of a running generation before the gateway gives up.
LLMP_STREAM_IDLE_TIMEOUT = env_float("LLMP_STREAM_IDLE_TIMEOUT", 120.0, minimum=1.0)
LLMP_REQUEST_LOG_RETENTION_DAYS = env_int("LLMP_REQUEST_LOG_RETENTION_DAYS", 7, minimum=1)
# What request history keeps of bodies: "full" (as sent and answered), "redacted" (every prompt,
# message content, input and answer text replaced by its length) or "metadata" (no bodies).
LLMP_REQUEST_LOG_BODIES = env_choice("LLMP_REQUEST_LOG_BODIES", "full", ("full", "redacted", "metadata"))
LLMP_DEFAULT_MAX_TOKENS = env_int("LLMP_DEFAULT_MAX_TOKENS", 512, minimum=1)
# Largest request body the gateway reads (a long chat history is well under this).
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("LLMP_MAX_REQUEST_BYTES", 8388608, minimum=1024)  # 8 MiB
# The ASGI guard (llmplatform.request_guard): the largest body of a management API or admin request
# other than a model upload; how long each piece of a request body may take to arrive (else 408); and
# how many refused API keys one client address may send within LLMP_AUTH_FAILURE_WINDOW seconds before
# it gets 429 until the window ends (0: no limit).
LLMP_API_MAX_REQUEST_BYTES = env_int("LLMP_API_MAX_REQUEST_BYTES", 1048576, minimum=1024)  # 1 MiB
LLMP_BODY_RECEIVE_TIMEOUT = env_float("LLMP_BODY_RECEIVE_TIMEOUT", 30.0, minimum=0.1)
LLMP_AUTH_FAILURE_LIMIT = env_int("LLMP_AUTH_FAILURE_LIMIT", 20, minimum=0)
LLMP_AUTH_FAILURE_WINDOW = env_int("LLMP_AUTH_FAILURE_WINDOW", 60, minimum=1)
LLMP_DEFAULT_MODEL_ID = "smollm2-135m-instruct"

# External models (apps.gateway.upstream): where their upstream API keys' encryption key comes
# from (HKDF of this, or of SECRET_KEY when empty; see apps.models.secrets), and how long the
# gateway waits for an upstream to accept a connection, and then for each piece of its answer.
LLMP_SECRETS_KEY = env_str("LLMP_SECRETS_KEY", "")
LLMP_UPSTREAM_CONNECT_TIMEOUT = env_float("LLMP_UPSTREAM_CONNECT_TIMEOUT", 10.0, minimum=0.1)
LLMP_UPSTREAM_TIMEOUT = env_float("LLMP_UPSTREAM_TIMEOUT", 600.0, minimum=1.0)

# Jobs (downloads, conversions, quantizations): a running job's lease, renewed by its runner;
# a job whose lease runs out lost its worker and is redelivered, up to this many attempts in all.
LLMP_JOB_LEASE_SECONDS = env_float("LLMP_JOB_LEASE_SECONDS", 30.0, minimum=1.0)
LLMP_JOB_MAX_ATTEMPTS = env_int("LLMP_JOB_MAX_ATTEMPTS", 3, minimum=1)
LLMP_JOB_PROGRESS_INTERVAL = env_float("LLMP_JOB_PROGRESS_INTERVAL", 0.5, minimum=0.0)
LLMP_JOB_EVENTS_MAXLEN = env_int("LLMP_JOB_EVENTS_MAXLEN", 100_000, minimum=100)
# A worker on another machine than the server: the server's base URL, to pull model files it lacks
# from the blob endpoint into its own LLMP_MODELS_DIR. Empty: the worker shares the server's store.
LLMP_SERVER_URL = env_str("LLMP_SERVER_URL", "")
# The local LLM API's generate: temperature when the request gives none.
LLMP_GENERATE_TEMPERATURE = env_float("LLMP_GENERATE_TEMPERATURE", 0.6, minimum=0.0)
# Directory of Hugging Face checkpoints on a node that a convert job may read (source_dir).
LLMP_CHECKPOINTS_DIR = env_path("LLMP_CHECKPOINTS_DIR", DATA_DIR / "checkpoints")
# Largest model file an upload may carry (default 10 GiB).
LLMP_UPLOAD_MAX_BYTES = env_int("LLMP_UPLOAD_MAX_BYTES", 10737418240, minimum=1024)
# Non-staff users may upload models (and delete their own uploads); off: uploads are for staff.
LLMP_USERS_MAY_UPLOAD = env_bool("LLMP_USERS_MAY_UPLOAD", False)

# Worker model pool (read by workers/, passed in as plain values).
LLMP_POOL_MAX_MODELS = env_int("LLMP_POOL_MAX_MODELS", 2, minimum=1)
LLMP_POOL_MEMORY_BUDGET_MB = env_int("LLMP_POOL_MEMORY_BUDGET_MB", 0, minimum=0)  # 0: 60% of RAM
# Sequences one model's runner decodes together (its batch), each with LLMP_N_CTX positions.
LLMP_POOL_SLOTS_PER_MODEL = env_int("LLMP_POOL_SLOTS_PER_MODEL", 8, minimum=1)
# How long a stopping worker lets the streams its runners serve run to their end.
LLMP_SHUTDOWN_DRAIN_SECONDS = env_float("LLMP_SHUTDOWN_DRAIN_SECONDS", 60.0, minimum=0.0)
# Tokens of one stream produced within this many milliseconds go to the gateway together (the first
# token and the end at once): fewer wake-ups of Redis, the gateway and the client per token. 0: each
# alone. At most 100: the runner's writer checks cancellations at least that often.
LLMP_STREAM_INTERVAL_MS = env_int("LLMP_STREAM_INTERVAL_MS", 25, minimum=0, maximum=100)
LLMP_N_CTX = env_int("LLMP_N_CTX", 4096, minimum=256)
LLMP_N_GPU_LAYERS = env_int("LLMP_N_GPU_LAYERS", -1)
LLMP_N_THREADS = env_int("LLMP_N_THREADS", 0, minimum=0)  # 0: every CPU the worker may use
LLMP_WORKER_CONCURRENCY = env_int("LLMP_WORKER_CONCURRENCY", 4, minimum=1)
# Seconds the start-up test decode (workers/selftest.py) may take before the node counts as unhealthy.
LLMP_SELFTEST_TIMEOUT = env_float("LLMP_SELFTEST_TIMEOUT", 120.0, minimum=1.0)
# A new model file is loaded once in a limited child process before it is registered (workers/trial_load.py):
# seconds it may take (plus one per 100 MB of file), and MiB of address space it may add besides twice the
# file (on top of the interpreter and llama.cpp's libraries).
LLMP_TRIAL_LOAD_TIMEOUT = env_float("LLMP_TRIAL_LOAD_TIMEOUT", 60.0, minimum=1.0)
LLMP_TRIAL_LOAD_MEMORY_MB = env_int("LLMP_TRIAL_LOAD_MEMORY_MB", 1024, minimum=64)

# --- DRF ---------------------------------------------------------------------------------
# What checks a bearer API key for llmplatform.authentication (the keys are the gateway's).
LLMP_API_KEY_CHECKER = "apps.gateway.selectors.api_key_check"
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "llmplatform.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PARSER_CLASSES": [
        "llmplatform.api_input.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "llmplatform.api_input.BoundedLimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "llmplatform.api_schema.ManagementAutoSchema",
    "EXCEPTION_HANDLER": "llmplatform.api_errors.management_exception_handler",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "llmplatform management API",
    "DESCRIPTION": "Nodes, models, API keys and request history of an llmplatform fleet.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
}
