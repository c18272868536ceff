"""Request and response models of the HTTP API (they define the OpenAPI document)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "AddResponse",
    "AddedItem",
    "DeleteResponse",
    "ErrorResponse",
    "Health",
    "Heatmap",
    "ItemResponse",
    "Match",
    "QueryInfo",
    "Readiness",
    "ReloadResponse",
    "SearchResponse",
    "Timings",
]


class ErrorResponse(BaseModel):
    """Every error the service itself raises (validation errors use FastAPI's 422 model)."""

    detail: str = Field(description="what was wrong, for humans")
    code: str = Field(description="machine-readable reason, e.g. 'not_an_image'")


class Heatmap(BaseModel):
    """Pooling weights of the feature-map grid: how much each location contributed."""

    height: int
    width: int
    grid: list[list[float]] = Field(description="row-major weights, mean 1 over the grid")
    overlay_url: str | None = Field(
        default=None, description="PNG overlay of the heatmap on the image (URL or data URL)"
    )


class Match(BaseModel):
    id: int
    rank: int = Field(description="1 for the best match")
    score: float = Field(description="cosine similarity")
    label: str | None
    source: str
    metadata: dict[str, Any]
    image_url: str
    thumbnail_url: str
    heatmap: Heatmap | None = None


class QueryInfo(BaseModel):
    width: int = Field(description="the upload's width in pixels, upright; for an item, the grid's")
    height: int = Field(
        description="the upload's height in pixels, upright; for an item, the grid's"
    )
    format: str | None = Field(description="decoded format, or null for a stored item")
    frames: int = Field(description="frames in the upload; only the first is used")
    id: int | None = Field(default=None, description="the gallery item used as the query")
    heatmap: Heatmap | None = None


class Timings(BaseModel):
    decode_ms: float
    embed_ms: float
    search_ms: float
    total_ms: float


class SearchResponse(BaseModel):
    model_fingerprint: str
    crop_fraction: float = Field(
        description="heatmaps cover the centred square of this fraction of the short side"
    )
    k: int
    label: str | None
    query: QueryInfo
    matches: list[Match]
    timings: Timings


class ItemResponse(BaseModel):
    id: int
    source: str
    sha256: str
    label: str | None
    added_at: str | float | None
    metadata: dict[str, Any]
    image_url: str
    thumbnail_url: str
    heatmap: Heatmap


class AddedItem(BaseModel):
    id: int
    sha256: str
    label: str | None
    source: str
    duplicate: bool = Field(description="the image was already in the gallery under this id")


class AddResponse(BaseModel):
    items: list[AddedItem]
    gallery_size: int


class DeleteResponse(BaseModel):
    id: int
    deleted: bool
    gallery_size: int


class ReloadResponse(BaseModel):
    previous_size: int
    gallery_size: int
    model_fingerprint: str


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    model_fingerprint: str
    device: str
    gallery_size: int
    batching: bool
    batch_max_size: int
