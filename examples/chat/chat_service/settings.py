"""Configuration from environment variables; every default runs with no service at all.

REDIS_URL                  streams, thread locks, the answer cache (and Celery's broker) in Redis
                           (default: all in this process)
DATABASE_URL               postgresql://... for checkpoints and threads (default: SQLite file)
CHAT_MODEL                 default model spec, "offline" unless set (see models.py)
BUSY_POLICY                a message on a busy thread: reject (409), interrupt or queue
CACHE_TTL                  seconds a first question's answer is replayed (0: no cache)
MAX_MESSAGE_CHARS          longer messages get 422
MAX_ANSWERS_PER_USER       answers one user may have queued or streaming at once (more: 429)
MAX_STREAMS                answer streams one API process serves at once (more: 503)
CORS_ORIGINS               comma-separated origins allowed to call the API (default: none)
SUMMARIZE_AFTER_TOKENS     history size that triggers a summary (0: never)
OFFLINE_TOKENS_PER_SECOND  pace of the offline model (0: as fast as possible)
WORKER_MODE                chat answers written by Celery workers (`python -m chat_service worker`;
                           LangGraph SDK runs stay in the API process)
SECRET_KEY                 signs session cookies (default: made once in DATA_DIR)
DATA_DIR                   where the SQLite file and the generated secret live
STREAM_LEASE               seconds after which a dead generator's answer ends with an error
STREAM_RETENTION           seconds a finished answer stays resumable
REDIS_PREFIX               prefix of every Redis key the service writes
WORKER_CONCURRENCY         answers one worker process writes at once (Celery threads)
WORKER_START_TIMEOUT       seconds a queued answer waits for a worker before it fails
WORKER_VISIBILITY_TIMEOUT  seconds before the task of a dead worker is delivered again (in time
                           to be answered only if below WORKER_START_TIMEOUT)
HOST, PORT                 where `python -m chat_service` listens

The README of the example has the same list with the defaults.
"""

from __future__ import annotations

import fcntl
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from .models import UnknownModelError, check_spec

BusyPolicy = Literal["reject", "interrupt", "queue"]
BUSY_POLICIES: tuple[BusyPolicy, ...] = ("reject", "interrupt", "queue")
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
#: The URL schemes resumable_stream.from_url takes for Redis (one server, Cluster, Sentinel).
REDIS_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)
#: The REDIS_URL schemes Celery's Redis broker takes (worker mode).
CELERY_SCHEMES = ("redis", "rediss", "unix")
#: The DATABASE_URL schemes the checkpointer and the thread store both take.
DATABASE_SCHEMES = ("postgres", "postgresql", "sqlite")


class SettingsError(ValueError):
    """An environment variable has a value the service cannot use."""


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment; see the module docstring."""

    redis_url: str | None = None
    database_url: str | None = None
    chat_model: str = "offline"
    busy_policy: BusyPolicy = "reject"
    cache_ttl: float = 3600.0
    max_message_chars: int = 8000
    max_answers_per_user: int = 4
    max_streams: int = 1000
    cors_origins: tuple[str, ...] = ()
    summarize_after_tokens: int = 3000
    offline_tokens_per_second: float = 40.0
    worker_mode: bool = False
    secret_key: str | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    stream_lease: float = 5.0
    stream_retention: float = 3600.0
    redis_prefix: str = "chat"
    worker_concurrency: int = 16
    worker_start_timeout: float = 60.0
    worker_visibility_timeout: float = 3600.0
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self) -> None:
        if self.busy_policy not in BUSY_POLICIES:
            raise SettingsError(f"BUSY_POLICY must be one of {', '.join(BUSY_POLICIES)}")
        if self.worker_mode and not self.redis_url:
            raise SettingsError("WORKER_MODE needs REDIS_URL: workers get their jobs through Redis")
        # Checked here, a wrong URL stops the start with one line, not a traceback from the
        # lifespan (the URL itself is not echoed: it may hold a password).
        if self.redis_url is not None and _scheme(self.redis_url) not in REDIS_SCHEMES:
            raise SettingsError(
                f"REDIS_URL must be a {', '.join(s + '://' for s in REDIS_SCHEMES)} URL, "
                f"not {_scheme(self.redis_url) or 'no'}://"
            )
        if self.worker_mode:
            check_celery_broker(self.redis_url, "WORKER_MODE")
        if self.database_url is not None and (
            _scheme(self.database_url) not in DATABASE_SCHEMES
            or (_scheme(self.database_url) == "sqlite" and "sqlite:///" not in self.database_url)
        ):
            raise SettingsError(
                "DATABASE_URL must be postgresql://user:password@host/db or sqlite:///path, "
                f"not {_scheme(self.database_url) or 'no'}://"
            )
        if "*" in self.cors_origins and len(self.cors_origins) > 1:
            raise SettingsError("CORS_ORIGINS is either * or a list of origins, not both")
        # The library refuses a lease under 0.1 s and a retention of 0; the offline model a
        # negative pace. Refused here, they fail at start-up rather than on every answer.
        for name, value, least in (
            ("CACHE_TTL", self.cache_ttl, 0),
            ("MAX_MESSAGE_CHARS", self.max_message_chars, 1),
            ("MAX_ANSWERS_PER_USER", self.max_answers_per_user, 1),
            ("MAX_STREAMS", self.max_streams, 1),
            ("SUMMARIZE_AFTER_TOKENS", self.summarize_after_tokens, 0),
            ("OFFLINE_TOKENS_PER_SECOND", self.offline_tokens_per_second, 0),
            ("STREAM_LEASE", self.stream_lease, 0.1),
            ("STREAM_RETENTION", self.stream_retention, 1),
            ("WORKER_CONCURRENCY", self.worker_concurrency, 1),
            ("WORKER_START_TIMEOUT", self.worker_start_timeout, 0.1),
            ("WORKER_VISIBILITY_TIMEOUT", self.worker_visibility_timeout, 1),
        ):
            if not math.isfinite(value) or value < least:
                raise SettingsError(f"{name} must be a finite number >= {least}, not {value}")
        if not 1 <= self.port <= 65535:
            raise SettingsError(f"PORT must be between 1 and 65535, not {self.port}")
        _check_specs("CHAT_MODEL", [self.chat_model])

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from `env` (the process environment by default)."""
        env = os.environ if env is None else env

        def text(name: str, default: str | None = None) -> str | None:
            value = env.get(name, "").strip()
            return value or default

        def number(name: str, default: float) -> float:
            value = text(name)
            try:
                return float(default if value is None else value)
            except ValueError:
                raise SettingsError(f"{name} must be a number, not {value!r}") from None

        def integer(name: str, default: int) -> int:
            value = number(name, default)
            # inf and nan are not integers either; int() would raise OverflowError/ValueError.
            if not value.is_integer():
                raise SettingsError(f"{name} must be a whole number, not {text(name)!r}")
            return int(value)

        policy = (text("BUSY_POLICY") or "reject").lower()
        if policy not in BUSY_POLICIES:
            raise SettingsError(f"BUSY_POLICY must be one of {', '.join(BUSY_POLICIES)}")
        origins = tuple(o.strip().rstrip("/") for o in (text("CORS_ORIGINS") or "").split(","))
        # models.available_models() reads CHAT_MODELS itself; a bad spec there was a 500.
        _check_specs("CHAT_MODELS", (text("CHAT_MODELS") or "").split(","))
        return cls(
            redis_url=text("REDIS_URL"),
            database_url=text("DATABASE_URL"),
            chat_model=text("CHAT_MODEL", "offline") or "offline",
            busy_policy=policy,
            cache_ttl=number("CACHE_TTL", 3600.0),
            max_message_chars=integer("MAX_MESSAGE_CHARS", 8000),
            max_answers_per_user=integer("MAX_ANSWERS_PER_USER", 4),
            max_streams=integer("MAX_STREAMS", 1000),
            cors_origins=tuple(o for o in origins if o),
            summarize_after_tokens=integer("SUMMARIZE_AFTER_TOKENS", 3000),
            offline_tokens_per_second=number("OFFLINE_TOKENS_PER_SECOND", 40.0),
            worker_mode=(text("WORKER_MODE") or "").lower() in {"1", "true", "yes", "on"},
            secret_key=text("SECRET_KEY"),
            data_dir=Path(text("DATA_DIR") or DEFAULT_DATA_DIR),
            stream_lease=number("STREAM_LEASE", 5.0),
            stream_retention=number("STREAM_RETENTION", 3600.0),
            redis_prefix=text("REDIS_PREFIX", "chat") or "chat",
            worker_concurrency=integer("WORKER_CONCURRENCY", 16),
            worker_start_timeout=number("WORKER_START_TIMEOUT", 60.0),
            worker_visibility_timeout=number("WORKER_VISIBILITY_TIMEOUT", 3600.0),
            host=text("HOST", "127.0.0.1") or "127.0.0.1",
            port=integer("PORT", 8000),
        )

    @property
    def transport_url(self) -> str:
        return self.redis_url or "memory://"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "chat.sqlite"

    @property
    def checkpoint_url(self) -> str:
        """The URL `open_checkpointer` gets: Postgres, or the SQLite file in DATA_DIR."""
        return self.database_url or f"sqlite:///{self.sqlite_path}"

    @property
    def uses_postgres(self) -> bool:
        return bool(self.database_url) and self.checkpoint_url.startswith(
            ("postgres://", "postgresql://")
        )

    @property
    def max_body_bytes(self) -> int:
        """Request bodies above this get 413 before they are parsed (4 bytes per character
        is UTF-8's worst case, plus room for the other fields)."""
        return self.max_message_chars * 4 + 4096

    def session_secret(self) -> bytes:
        """SECRET_KEY, or a random key made once and kept in DATA_DIR, so sessions survive
        a restart. Several processes (API replicas, workers) must share SECRET_KEY."""
        if self.secret_key:
            return self.secret_key.encode()
        path = self.data_dir / "secret_key"
        key = _read_key(path)
        if not key:
            # Missing, or empty (left by a process that died as it made the key): anyone
            # could sign cookies with an empty key. Made under a lock, so that processes
            # starting together keep one key, and written whole under another name, then
            # put in place, so that no process reads it half written.
            self.data_dir.mkdir(parents=True, exist_ok=True)
            with open(self.data_dir / ".secret_key.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # (let go when the file closes)
                key = _read_key(path)
                if not key:
                    made = path.with_name(f".secret_key.{secrets.token_hex(8)}")
                    fd = os.open(made, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        with os.fdopen(fd, "w") as file:
                            file.write(secrets.token_urlsafe(32))
                            file.flush()
                            os.fsync(file.fileno())
                        os.replace(made, path)
                    finally:
                        made.unlink(missing_ok=True)
                    key = _read_key(path)
        if not key:
            raise SettingsError(f"{path} holds no key: delete it, or set SECRET_KEY")
        return key


def _read_key(path: Path) -> bytes | None:
    """The key kept at ``path``, stripped (``b""`` if the file is empty); None if none."""
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        return None


def _check_specs(name: str, specs: list[str]) -> None:
    for spec in (s.strip() for s in specs):
        if spec:
            try:
                check_spec(spec)
            except UnknownModelError as exc:
                raise SettingsError(f"{name}: {exc}") from None


def check_celery_broker(redis_url: str | None, who: str) -> None:
    """SettingsError unless Celery's Redis broker takes ``redis_url`` (worker mode)."""
    if _scheme(redis_url or "") not in CELERY_SCHEMES:
        raise SettingsError(
            f"{who} needs a {', '.join(s + '://' for s in CELERY_SCHEMES)} REDIS_URL "
            "(Celery's broker takes neither Sentinel nor Cluster URLs)"
        )


def _scheme(url: str) -> str:
    return urlsplit(url).scheme.lower()
