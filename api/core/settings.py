"""Service configuration: one validated :class:`Settings` object, injected everywhere.

Every field is read from the environment under its plain upper-case name
(``DATABASE_URL``, ``BROKER_URL``, ``STORE_URL``, ``MAX_MODEL_BYTES``, ...) or the
same name prefixed with ``CLEANROOM_`` (``CLEANROOM_DATABASE_URL``); the prefixed
name wins when both are set. A few fields also accept the conventional AWS names
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``AWS_ENDPOINT_URL``). Nothing else in the code base reads ``os.environ``.

The defaults need no server: a SQLite database, a kombu ``filesystem://`` broker
and an artifact folder, all under ``data_dir`` (``./var``). Production sets
``DATABASE_URL`` (PostgreSQL; ``postgresql://`` is normalised to the psycopg 3
driver), ``BROKER_URL`` (Redis) and ``STORE_URL`` (``s3://bucket/prefix`` with
``S3_ENDPOINT_URL`` and keys).

Tests build ``Settings(database_url=..., store_url=...)`` directly; keyword
arguments always beat the environment.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Self

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "CLEANROOM_"
GIB = 1 << 30


def _env(name: str, *extra: str) -> AliasChoices:
    """Environment names of a field: prefixed first, then plain, then ``extra``."""
    upper = name.upper()
    return AliasChoices(ENV_PREFIX + upper, upper, *extra)


def normalize_database_url(url: str) -> str:
    """Route PostgreSQL URLs to the psycopg 3 driver (the only one installed)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


class Settings(BaseSettings):
    """Configuration of the API and the worker (see the module docstring for env names)."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="ignore",
        populate_by_name=True,
        case_sensitive=False,
    )

    data_dir: Path = Field(
        default=Path("./var"),
        validation_alias=_env("data_dir"),
        description="Folder for the embedded defaults (SQLite file, broker folder, artifacts). "
        "Made absolute at start-up.",
    )
    database_url: str = Field(
        default_factory=lambda data: f"sqlite:///{data['data_dir'] / 'cleanroom.db'}",
        validation_alias=_env("database_url"),
        description="SQLAlchemy URL. Default: SQLite file <data_dir>/cleanroom.db. "
        "postgresql:// and postgres:// are rewritten to postgresql+psycopg://.",
    )
    database_echo: bool = Field(
        default=False,
        validation_alias=_env("database_echo"),
        description="Log every SQL statement (debugging only).",
    )
    broker_url: str = Field(
        default="filesystem://",
        validation_alias=_env("broker_url"),
        description="Celery broker URL. Default: kombu's filesystem transport "
        "(folders under broker_folder); production: redis://host:6379/0.",
    )
    broker_folder: Path = Field(
        default_factory=lambda data: data["data_dir"] / "broker",
        validation_alias=_env("broker_folder"),
        description="Folder of the filesystem broker (used only with broker_url filesystem://).",
    )
    store_url: str = Field(
        default_factory=lambda data: str(data["data_dir"] / "artifacts"),
        validation_alias=_env("store_url"),
        description="Artifact store: a local folder path (or file:// URL), or s3://bucket/prefix.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=_env("s3_endpoint_url", "AWS_ENDPOINT_URL"),
        description="S3 endpoint for S3-compatible stores (MinIO, SeaweedFS); None = AWS.",
    )
    s3_access_key_id: str | None = Field(
        default=None,
        validation_alias=_env("s3_access_key_id", "AWS_ACCESS_KEY_ID"),
        description="S3 access key id; None = boto3's default credential chain.",
    )
    s3_secret_access_key: SecretStr | None = Field(
        default=None,
        validation_alias=_env("s3_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
        description="S3 secret access key (kept out of reprs and logs).",
    )
    s3_region: str = Field(
        default="us-east-1",
        validation_alias=_env("s3_region", "AWS_REGION", "AWS_DEFAULT_REGION"),
        description="S3 region name.",
    )
    max_model_bytes: int = Field(
        default=2 * GIB,
        gt=0,
        validation_alias=_env("max_model_bytes"),
        description="Largest accepted model upload, in bytes (413 above).",
    )
    max_dataset_bytes: int = Field(
        default=2 * GIB,
        gt=0,
        validation_alias=_env("max_dataset_bytes"),
        description="Largest accepted dataset upload, in bytes (413 above).",
    )
    upload_chunk_bytes: int = Field(
        default=1 << 20,
        ge=4096,
        le=64 << 20,
        validation_alias=_env("upload_chunk_bytes"),
        description="Chunk size used when streaming uploads and downloads.",
    )
    job_soft_time_limit_s: int = Field(
        default=4 * 3600,
        gt=0,
        validation_alias=_env("job_soft_time_limit_s"),
        description="Soft time limit of a purification task (the task is asked to stop).",
    )
    job_time_limit_s: int = Field(
        default=4 * 3600 + 300,
        gt=0,
        validation_alias=_env("job_time_limit_s"),
        description="Hard time limit of a purification task (the worker process is killed). "
        "Must exceed job_soft_time_limit_s.",
    )
    job_max_attempts: int = Field(
        default=2,
        ge=1,
        le=10,
        validation_alias=_env("job_max_attempts"),
        description="Deliveries of a job before it is marked failed (worker lost, re-queued).",
    )
    heartbeat_interval_s: float = Field(
        default=10.0,
        gt=0,
        validation_alias=_env("heartbeat_interval_s"),
        description="How often a running job refreshes its heartbeat_at.",
    )
    heartbeat_stale_s: float = Field(
        default=120.0,
        gt=0,
        validation_alias=_env("heartbeat_stale_s"),
        description="A running job whose heartbeat is older than this is considered lost. "
        "Must exceed heartbeat_interval_s.",
    )
    progress_interval_s: float = Field(
        default=1.0,
        ge=0,
        validation_alias=_env("progress_interval_s"),
        description="Minimum seconds between two progress events of a job (throttling).",
    )
    worker_concurrency: int = Field(
        default=1,
        ge=1,
        le=64,
        validation_alias=_env("worker_concurrency"),
        description="Celery worker processes per worker host (one job each).",
    )
    cpu_mode_cache: Path | None = Field(
        default=None,
        validation_alias=_env("cpu_mode_cache"),
        description="JSON file in which a CPU worker remembers the compute mode (fp32, channels-last, "
        "bf16) it chose by timing, per model architecture and input shape, so a model computes the "
        "same way after a worker restart. Default: <data_dir>/cpu-modes.json.",
    )
    scratch_dir: Path | None = Field(
        default=None,
        validation_alias=_env("scratch_dir"),
        description="Folder of the per-job and per-upload scratch directories a contained child "
        "reads its inputs from and writes its outputs to (the only place it can write). "
        "Left-overs of a killed attempt are removed by the next attempt and by the reaper. "
        "Default: <data_dir>/scratch.",
    )
    job_memory_bytes: int = Field(
        default=8 * GIB,
        ge=256 << 20,
        validation_alias=_env("job_memory_bytes"),
        description="Memory bound of a job's contained child (data segment rlimit and a "
        "resident-memory watchdog); a job that passes it fails with resource-limit.",
    )
    model_validation_memory_bytes: int = Field(
        default=3 * GIB // 2,
        ge=256 << 20,
        validation_alias=_env("model_validation_memory_bytes"),
        description="Memory bound of the contained child that validates a model upload, plus "
        "four times the file's size (the interpreter and torch take about 0.8 GiB of it).",
    )
    model_validation_timeout_s: float = Field(
        default=60.0,
        gt=0,
        validation_alias=_env("model_validation_timeout_s"),
        description="Wall-clock bound of a model upload's validation (load and forward passes "
        "in a contained child); past it the child is killed and the upload refused.",
    )
    sandbox_spares: int = Field(
        default=1,
        ge=0,
        le=4,
        validation_alias=_env("sandbox_spares"),
        description="Warm contained children (torch imported, waiting for one request) each API "
        "and worker process keeps, so a validation or job does not wait for an interpreter start.",
    )
    allow_code_models: bool = Field(
        default=True,
        validation_alias=_env("allow_code_models"),
        description="Accept model formats that carry code (TorchScript, torch.export) at all; "
        "an organization can also refuse them for itself.",
    )
    http_header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        validation_alias=_env("http_header_timeout_s"),
        description="Served with --http api.http_protocol:ProblemH11Protocol: a connection must send "
        "a request's complete headers within this many seconds (408 problem+json otherwise).",
    )
    http_body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        validation_alias=_env("http_body_timeout_s"),
        description="Served with --http api.http_protocol:ProblemH11Protocol: the longest pause "
        "allowed between two pieces of a request body before the connection is closed.",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        validation_alias=_env("metrics_token"),
        description="When set, GET /metrics needs 'Authorization: Bearer <token>'. When not set, "
        "/metrics answers only clients on a loopback address (put a scraper on the same host "
        "or set the token).",
    )
    api_key_touch_interval_s: float = Field(
        default=60.0,
        ge=0,
        validation_alias=_env("api_key_touch_interval_s"),
        description="last_used_at of an API key is written at most this often.",
    )

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("database_url", mode="after")
    @classmethod
    def _normalize_database_url(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("database_url must not be empty")
        return normalize_database_url(value.strip())

    @field_validator("store_url", mode="after")
    @classmethod
    def _check_store_url(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("store_url must not be empty")
        if value.startswith("s3://") and not value[len("s3://"):].split("/", 1)[0]:
            raise ValueError(f"store_url {value!r} names no bucket (expected s3://bucket/prefix)")
        return value

    @model_validator(mode="after")
    def _check_limits(self) -> Self:
        if self.job_time_limit_s <= self.job_soft_time_limit_s:
            raise ValueError(
                f"job_time_limit_s ({self.job_time_limit_s}) must exceed "
                f"job_soft_time_limit_s ({self.job_soft_time_limit_s})"
            )
        if self.heartbeat_stale_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_stale_s ({self.heartbeat_stale_s}) must exceed "
                f"heartbeat_interval_s ({self.heartbeat_interval_s})"
            )
        return self

    # -- derived values -------------------------------------------------------------

    @property
    def cpu_mode_cache_path(self) -> Path:
        return (self.cpu_mode_cache or self.data_dir / "cpu-modes.json").expanduser()

    @property
    def scratch_path(self) -> Path:
        return (self.scratch_dir or self.data_dir / "scratch").expanduser().resolve()

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def store_is_s3(self) -> bool:
        return self.store_url.startswith("s3://")

    def s3_location(self) -> tuple[str, str]:
        """``(bucket, prefix)`` of an ``s3://bucket/prefix`` store URL (prefix without slashes)."""
        if not self.store_is_s3:
            raise ValueError(f"store_url {self.store_url!r} is not an s3:// URL")
        bucket, _, prefix = self.store_url[len("s3://"):].partition("/")
        return bucket, prefix.strip("/")

    def local_store_root(self) -> Path:
        """Folder of a local store URL (plain path or ``file://`` URL)."""
        if self.store_is_s3:
            raise ValueError(f"store_url {self.store_url!r} is not a local folder")
        raw = self.store_url.removeprefix("file://")
        return Path(raw).expanduser().resolve()

    def ensure_dirs(self) -> None:
        """Create the local folders the embedded defaults need (idempotent)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.broker_url.startswith("filesystem://"):
            self.broker_folder.mkdir(parents=True, exist_ok=True)
        if not self.store_is_s3:
            self.local_store_root().mkdir(parents=True, exist_ok=True)

    def safe_dict(self) -> dict[str, Any]:
        """The settings as JSON-friendly values, secrets masked (for logs and diagnostics)."""
        values = self.model_dump(mode="json")
        if self.s3_secret_access_key is not None:
            values["s3_secret_access_key"] = "**********"
        values["database_url"] = _mask_password(self.database_url)
        values["broker_url"] = _mask_password(self.broker_url)
        return values


def _mask_password(url: str) -> str:
    """Hide the password of ``scheme://user:password@host`` URLs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user, colon, _ = credentials.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings read from the environment (tests build their own)."""
    return Settings()
