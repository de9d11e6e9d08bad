"""One settings object, read from the environment (prefix ``CARSEG_``) and validated at start."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
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

    # request limits
    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_side: int = Field(1024, ge=8)
    max_pixels: int = Field(1024 * 1024, ge=64)
    max_k: int = Field(64, ge=1)
    default_k: int = Field(16, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)

    # dynamic batching: a batch closes at this many samples (sum of k) or after this delay. 16 suits
    # a CPU, where a batch of 64 samples ran slower than the same samples one image at a time
    # (bench/serve.py); on a GPU raise it (docker-compose sets 256 for the GPU worker)
    batch_max_samples: int = Field(16, ge=1)
    batch_max_delay_ms: float = Field(2.0, ge=0)
    max_queued_jobs: int = Field(512, ge=1)
    decode_batch: int = Field(64, ge=1)

    # Redis Streams queue (--queue redis) and its workers
    redis_prefix: str = "carseg"
    visibility_timeout_s: float = Field(60.0, gt=0, description="a job pending this long is reclaimed from its worker")
    max_deliveries: int = Field(3, ge=1, description="deliveries before a job goes to the dead-letter stream")
    heartbeat_interval_s: float = Field(2.0, gt=0)
    heartbeat_ttl_s: float = Field(10.0, gt=0)
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
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
