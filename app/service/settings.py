"""Service settings, read from ``GSP_*`` environment variables or an optional ``.env`` file."""

from __future__ import annotations

import hmac
import ipaddress
import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.hardware import DEVICE_NAMES, GraphMode, Precision, check_device_name, usable_cpus
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
    precision: Precision = Field(
        default="auto",
        description="the network's arithmetic, as `gsp index build --precision`: auto is fp16 "
        "autocast on CUDA and fp32 on the CPU, so uploads embed as the indexer embedded files",
    )
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
    read_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="keys for the search and image routes; when set, reads need one of them or "
        "a write key (header X-API-Key, or the cookie the page's key form sets)",
    )
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
    max_in_flight_per_client: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description="requests one client (its key, else its address) may have open at once, "
        "bodies still arriving included; more get 429. 0: no per-client limit",
    )
    trusted_proxies: Annotated[list[ipaddress.IPv4Network | ipaddress.IPv6Network], NoDecode] = (
        Field(
            default_factory=list,
            description="addresses or networks of reverse proxies whose X-Forwarded-For and "
            "X-Forwarded-Proto name the client and scheme; from any other peer they are ignored",
        )
    )
    max_header_bytes: int = Field(
        default=64 * 1024, ge=1024, description="bytes of request line and headers; more get 431"
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        description="seconds a client has to send a request's headers; then 408 and the "
        "connection is closed",
    )
    body_timeout_s: float = Field(
        default=60.0,
        gt=0.0,
        description="seconds a client has to send a request's whole body; then 408. No request "
        "takes an in-flight slot before its body is in",
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

    @field_validator(
        "api_keys", "read_keys", "cors_origins", "image_roots", "trusted_proxies", mode="before"
    )
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

    @property
    def reads_need_key(self) -> bool:
        return bool(self.read_keys)

    def grants_read(self, key: str | None) -> bool:
        """Whether ``key`` is a read key or a write key (write keys read too); constant-time
        in the key's contents."""
        if not key:
            return False
        given = key.encode()
        return any(
            hmac.compare_digest(given, valid.get_secret_value().encode())
            for valid in (*self.read_keys, *self.api_keys)
        )
