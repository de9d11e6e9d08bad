"""One settings object, read from the environment (prefix ``CARSEG_``) and validated at start."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_MODELS = Path(__file__).resolve().parents[1] / "models"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CARSEG_", extra="forbid")

    model_dir: Path = REPO_MODELS
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    queue: Literal["local", "redis"] = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"
    device: str = "auto"

    # who may call: API keys as `Authorization: Bearer <key>`, each a key or sha256:<hex of the key>,
    # comma separated, or one per line in a file. Without keys the service binds loopback only
    api_keys: SecretStr | None = None
    api_keys_file: Path | None = None
    metrics_require_key: bool = False
    cors_origins: str = Field("", description="comma-separated origins a browser page may call from (viewer pages)")
    log_format: Literal["json", "text"] = "json"

    # admission, per API process: a token bucket per key and in-flight caps per key and in total
    rate_limit_per_s: float = Field(100.0, ge=0, description="requests per second per key (0: no limit)")
    rate_limit_burst: int = Field(200, ge=1)
    max_in_flight: int = Field(256, ge=1)
    max_in_flight_per_key: int = Field(64, ge=1)

    # request limits
    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_side: int = Field(1024, ge=8)
    max_pixels: int = Field(1024 * 1024, ge=64)
    max_k: int = Field(64, ge=1)
    default_k: int = Field(16, ge=1)
    # A request's cost is pixels x k, not either alone. 2**23 admits 1024 x 1024 at k = 8, 512 x 512
    # at k = 32 and 256 x 256 at k = 64: about 30 s of one CPU core at the most; raise it on a GPU
    max_pixel_samples: int = Field(2**23, ge=64, description="largest height x width x k a request may ask for")
    # a volume (NIfTI, a DICOM series) is segmented slice by slice, each slice under the limits above;
    # the whole costs slices x pixels x max(k, 8) (8: the float maps an answer may hold per voxel):
    # 2**25 admits 128 x 128 x 64 at k = 32, 128 x 128 x 256 or 512 x 512 x 16 at k <= 8
    max_slices: int = Field(512, ge=1, description="most slices (or DICOM files) in one request")
    max_volume_pixel_samples: int = Field(2**25, ge=64, description="largest slices x height x width x k a volume may ask for")
    request_timeout_s: float = Field(60.0, gt=0)
    # MONAI Label sessions (3D Slicer uploads a volume once, then segments it by id), in API memory
    max_sessions: int = Field(32, ge=1)
    max_session_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="all sessions' files together")
    session_expiry_s: int = Field(3600, ge=60)
    # the PACS a viewer's image ids refer to (OHIF names a series by its UID): its DICOMweb root,
    # e.g. http://orthanc:8042/dicom-web, and a bearer token if it asks for one
    dicomweb_url: str | None = None
    dicomweb_token: SecretStr | None = None

    # dynamic batching: a batch closes at this many samples (sum of k) or after this delay. 16 suits
    # a CPU, where a batch of 64 samples ran slower than the same samples one image at a time
    # (bench/serve.py); on a GPU raise it (docker-compose sets 256 for the GPU worker)
    batch_max_samples: int = Field(16, ge=1)
    # The in-process queue's parallel runners, each with its own batches and sampler calls. On a CPU,
    # torch releases the GIL inside its ops, and single-thread executors side by side beat one
    # executor with every thread for small k (a k=1 decoder step is too small to split across
    # cores): None gives one per CPU thread, each computing with one thread; on a GPU, one.
    executors: int | None = Field(None, ge=1, description="in-process runners (default: one per CPU thread; one on a GPU)")
    batch_max_delay_ms: float = Field(2.0, ge=0)
    max_queued_jobs: int = Field(512, ge=1)
    decode_batch: int = Field(64, ge=1)
    # the peak memory of a process's sampler calls (on the device that runs them): G decodes as many
    # samples at once as fit; parallel executors share it. 1536 MiB serves 1024 x 1024 at k = 64 in
    # a 2 GB worker (torch and the models take about 270 MB more); a GPU worker can afford more, and
    # decodes faster in larger chunks
    sampler_memory_mb: int = Field(1536, ge=64)

    # Redis Streams queue (--queue redis) and its workers
    redis_prefix: str = "carseg"
    # A dead worker's jobs move when its heartbeat is older than heartbeat_ttl_s (seconds); the
    # visibility timeout is for a worker that beats but is stuck, and is shorter than the request
    # deadline by construction, so a reclaimed job can still be answered in time
    visibility_timeout_s: float = Field(30.0, gt=0, description="a job pending this long is reclaimed even from a live worker")
    max_deliveries: int = Field(3, ge=1, description="deliveries before a job goes to the dead-letter stream")
    heartbeat_interval_s: float = Field(1.0, gt=0)
    heartbeat_ttl_s: float = Field(4.0, gt=0, description="a worker whose heartbeat is older is dead: its jobs are reclaimed")
    result_ttl_s: int = Field(120, ge=1)
    stream_maxlen: int = Field(10_000, ge=16, description="approximate cap on a stream's length (memory bound)")
    worker_block_ms: int = Field(200, ge=1)
    worker_metrics_port: int | None = None

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k {self.default_k} exceeds max_k {self.max_k}")
        if self.max_pixels > self.max_side * self.max_side:
            self.max_pixels = self.max_side * self.max_side
        if self.heartbeat_ttl_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_ttl_s {self.heartbeat_ttl_s} must be at least twice heartbeat_interval_s {self.heartbeat_interval_s}: "
                "one late beat would otherwise make a live worker look dead"
            )
        if not self.heartbeat_ttl_s < self.visibility_timeout_s < self.request_timeout_s:
            raise ValueError(
                f"need heartbeat_ttl_s ({self.heartbeat_ttl_s}) < visibility_timeout_s ({self.visibility_timeout_s}) < "
                f"request_timeout_s ({self.request_timeout_s}): a job reclaimed from a stuck worker must still have time "
                "to run before its client's deadline"
            )
        return self


def masked_url(url: str) -> str:
    """A URL fit for a log: its password, if any, replaced by ***."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
