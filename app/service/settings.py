"""Service settings, read from ``GSP_*`` environment variables or an optional ``.env`` file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.graphs import GraphMode
from model.hardware import DEVICE_NAMES, check_device_name, usable_cpus
from model.runtime import Kernel, RuntimeOptions

__all__ = ["Settings"]

_RUNTIME_DEFAULTS = RuntimeOptions()


def _split_list(value: object) -> object:
    """Accept ``a,b,c`` as well as a JSON list, so that env variables stay easy to write."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything the service needs to start; every field maps to ``GSP_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="GSP_", env_file=".env", extra="ignore")

    checkpoint: Path = Field(description="checkpoint directory (model.safetensors + config.json)")
    gallery: Path = Field(description="gallery directory built with the same checkpoint")
    gallery_read_only: bool = Field(
        default=False,
        description="open the gallery read-only: no API writes, and an indexer may update the "
        "same directory in place or publish new versions into it (`gsp index publish`), which "
        "the service follows (gallery_follow_interval_s; SIGHUP or reload-gallery at once)",
    )
    device: str = Field(default="auto", description=f"where the network runs: {DEVICE_NAMES}")
    kernel: Kernel = Field(
        default=_RUNTIME_DEFAULTS.kernel,
        description="how the GSP layer runs on CUDA: 'compiled' (torch.compile'd parts) or "
        "'triton' (hand-written kernels)",
    )
    compile: bool = Field(
        default=_RUNTIME_DEFAULTS.compile,
        description="torch.compile the GSP layer's parts on CUDA (false: run them eagerly)",
    )
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    max_pixels: int = Field(default=40_000_000, gt=0, description="decoded width x height limit")
    max_k: int = Field(default=100, ge=1, le=10_000)
    default_k: int = Field(default=10, ge=1)
    max_add_images: int = Field(default=64, ge=1, description="images per POST /v1/gallery")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, repr=False)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    image_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="extra directories whose files gallery items may be served from",
    )
    batching: bool = True
    batch_max_size: int = Field(default=16, ge=1, le=1024)
    batch_max_wait_ms: float = Field(default=2.0, ge=0.0, le=1000.0)
    max_in_flight: int = Field(
        default=128,
        ge=1,
        le=100_000,
        description="requests in progress at once; more get 503 with Retry-After "
        "(/healthz, /readyz and /metrics are never refused)",
    )
    thumbnail_size: int = Field(default=256, ge=16, le=2048)
    cpu_workers: int = Field(
        default_factory=usable_cpus,
        ge=1,
        le=256,
        description="threads that decode uploads and draw thumbnails, heatmaps and explanations "
        "(at most this many images are decoded at once); default: the usable CPUs",
    )
    gallery_save_every: int = Field(
        default=100, ge=1, description="API writes after which the gallery index is snapshotted"
    )
    gallery_save_interval_s: float = Field(
        default=60.0,
        gt=0.0,
        description="seconds after the first unsnapshotted write that a snapshot is written "
        "anyway (writes are durable in the database before the API answers)",
    )

    cuda_graphs: GraphMode = Field(
        default="off",
        description="on CUDA: replay the embedding forward as CUDA graphs per bucketed batch "
        "size ('graphs': captured, 'reduce-overhead': torch.compile's), see model/graphs.py",
    )
    processes: int = Field(
        default=1,
        ge=1,
        le=256,
        description="server processes on the one port: the first writes the gallery, the others "
        "open it read-only, follow its writes and forward theirs to it (docs/architecture.md)",
    )
    gallery_follow_interval_s: float = Field(
        default=0.25,
        ge=0.0,
        le=60.0,
        description="how often a read-only gallery (every process but the first, or "
        "gallery_read_only) looks for writes made by another process or a new publication; "
        "0: only on reload",
    )

    @field_validator("api_keys", "cors_origins", "image_roots", mode="before")
    @classmethod
    def _lists_from_text(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device_name(value)

    @model_validator(mode="after")
    def _check_k(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) exceeds max_k ({self.max_k})")
        return self

    @property
    def effective_batch_size(self) -> int:
        """Batching off means every query runs alone."""
        return self.batch_max_size if self.batching else 1

    def api_key_values(self) -> frozenset[str]:
        return frozenset(key.get_secret_value() for key in self.api_keys)
